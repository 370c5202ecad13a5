"""Memory order of quantized codes: the vocabulary shared by the kernels and the layout pass.

Low-level on purpose: the fused quantize kernels allocate codes in these orders, and the pass
that chooses them (``code_layout.py``) sits above every kernel module.
"""

from __future__ import annotations

import enum

import torch

from fqt_compiler.layout import Layout

__all__ = [
    "CodeLayout", "SAVED_LAYOUT", "alloc_like", "alloc_codes", "alloc_output", "column_major_ok", "ALIGN_BYTES",
    "in_input_layout", "empty_in_input_layout", "is_channels_last",
]

# GEMM operands whose leading stride is a multiple of 16 bytes are copied asynchronously (and
# vectorized); an 8-bit operand with an unaligned K (a 50257-entry vocabulary) is not. Codes
# are therefore allocated with their leading dimension padded to this many bytes.
ALIGN_BYTES = 16

SAVED_LAYOUT = "fqt_saved_codes_layout"  # meta key on a forward quantizer's codes node


class CodeLayout(enum.IntEnum):
    """Memory order of a fused quantizer's codes (their shape is the quantizer's input shape).

    * ``NATURAL``: contiguous.
    * ``COLUMN_MAJOR``: the codes flattened to ``(rows, last dim)`` are stored column by column,
      so a low-bit GEMM that reads them transposed (the right operand ``B = codes``, K along
      the rows) reads them K-major: on sm_90 an 8-bit operand that is not K-major cannot be
      copied asynchronously into the shared-memory layout ``wgmma`` needs.
    * ``BOTH``: natural codes, and a column-major copy written from the same registers (for
      codes read both ways, or kept contiguous for another graph).
    * ``CHANNELS_LAST``: codes of an ``(N, C, *spatial)`` tensor stored as ``(N, *spatial, C)``,
      and so is the high-precision value: the memory order of the channels-last activation
      they quantize, which the quantize op's codes keep (:func:`in_input_layout`) and the
      convolution kernels read channels K-major in.
    """

    NATURAL = 0
    COLUMN_MAJOR = 1
    BOTH = 2
    CHANNELS_LAST = 3


def alloc_like(shape: tuple, dtype: torch.dtype, device, column_major: bool, pad: bool = False) -> torch.Tensor:
    """An empty tensor of ``shape``: contiguous, or column-major in its ``(rows, last dim)``
    flattening (a view of a contiguous ``(last dim, rows)`` buffer). ``pad``: the contiguous
    dimension's stride (the last dim's, or the rows' when column-major) rounded up to
    :data:`ALIGN_BYTES`, the padding never written nor read."""
    if len(shape) < 2:
        return torch.empty(shape, dtype=dtype, device=device)
    rows = 1
    for d in shape[:-1]:
        rows *= d
    inner, outer = (rows, shape[-1]) if column_major else (shape[-1], rows)
    step = max(1, ALIGN_BYTES // dtype.itemsize) if pad else 1
    padded = -(-inner // step) * step
    buf = torch.empty((outer, padded), dtype=dtype, device=device).narrow(1, 0, inner)
    return (buf.t() if column_major else buf).view(shape)


def alloc_codes(shape: tuple, dtype: torch.dtype, device, column_major: bool, layout: Layout) -> torch.Tensor:
    """Codes of ``shape`` in their memory order, the leading dimension padded to 16 bytes where
    a GEMM reads it as K: 8-bit codes, 2-D or grouped along the penultimate dim (the shapes
    whose rows a strided view merges; others stay unpadded)."""
    pad = dtype.itemsize == 1 and (len(shape) == 2 or len(shape) > 2 and layout is Layout.PENULTIMATE)
    return alloc_like(shape, dtype, device, column_major, pad=pad)


def alloc_output(shape: tuple, dtype: torch.dtype, device, code_layout: CodeLayout, layout: Layout,
                 codes: bool = True) -> torch.Tensor:
    """A fused quantizer's codes (``codes``) or high-precision value, empty, in the memory order
    ``code_layout`` gives it (``BOTH``'s first output is the natural one): what the op and its
    fake allocate alike."""
    code_layout = CodeLayout(code_layout)
    if code_layout is CodeLayout.CHANNELS_LAST and len(shape) >= 3:
        return torch.empty((shape[0], *shape[2:], shape[1]), dtype=dtype, device=device).movedim(-1, 1)
    if not codes:
        return torch.empty(shape, dtype=dtype, device=device)
    return alloc_codes(shape, dtype, device, code_layout is CodeLayout.COLUMN_MAJOR, layout)


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` (3+ dims, not contiguous) is stored with dim 1 innermost, the others in order."""
    return t.dim() >= 3 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()


def column_major_ok(shape: tuple, layout: Layout) -> bool:
    """Whether column-major codes of ``shape`` have a strided grouped view for ``layout``
    (2-D codes always; more dims only where the grouped rows merge the leading dims)."""
    return len(shape) == 2 or len(shape) > 2 and layout is Layout.PENULTIMATE


def in_input_layout(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (``x``'s shape) in ``x``'s memory order where that is a dense layout other than
    contiguous of a tensor of 3+ dims (a channels-last activation); contiguous otherwise.

    A quantizer's output replaces ``x`` in the graph, whose later views were traced on ``x``'s
    strides: a channels-last activation quantized into contiguous codes made a convolution
    return another layout than traced, and a later ``view`` fail. 2-D GEMM operands keep
    contiguous codes (their memory order is chosen by the code-layout pass). Real ops and
    their fakes share this rule (``empty_in_input_layout``)."""
    if x.dim() < 3 or x.is_contiguous():
        return t.contiguous()
    like = torch.empty_like(x, dtype=t.dtype)  # x's strides where x is dense, else contiguous
    return t if like.stride() == t.stride() else like.copy_(t)


def empty_in_input_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fake twin of :func:`in_input_layout`: an empty tensor of ``x``'s shape and that layout."""
    return torch.empty_like(x, dtype=dtype) if x.dim() >= 3 else x.new_empty(x.shape, dtype=dtype)
