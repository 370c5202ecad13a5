"""Memory order of quantized codes: the vocabulary shared by the kernels and the layout pass.

Low-level on purpose: the fused quantize kernels allocate codes in these orders, and the pass
that chooses them (``code_layout.py``) sits above every kernel module.
"""

from __future__ import annotations

import enum

import torch

from fqt_compiler.layout import Layout

__all__ = ["CodeLayout", "SAVED_LAYOUT", "alloc_like", "column_major_ok"]

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
    """

    NATURAL = 0
    COLUMN_MAJOR = 1
    BOTH = 2


def alloc_like(shape: tuple, dtype: torch.dtype, device, column_major: bool) -> torch.Tensor:
    """An empty tensor of ``shape``: contiguous, or column-major in its ``(rows, last dim)``
    flattening (a view of a contiguous ``(last dim, rows)`` buffer)."""
    if not column_major or len(shape) < 2:
        return torch.empty(shape, dtype=dtype, device=device)
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return torch.empty((shape[-1], rows), dtype=dtype, device=device).t().view(shape)


def column_major_ok(shape: tuple, layout: Layout) -> bool:
    """Whether column-major codes of ``shape`` have a strided grouped view for ``layout``
    (2-D codes always; more dims only where the grouped rows merge the leading dims)."""
    return len(shape) == 2 or len(shape) > 2 and layout is Layout.PENULTIMATE
