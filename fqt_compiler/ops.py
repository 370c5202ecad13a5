"""The ``fqt`` custom ops inserted into graphs, with fake (meta) implementations.

* ``fqt::quantize(x, spec, layout) -> (codes, scale, zero_point, offset)``: round-to-nearest
  quantization to low-bit codes. The passes follow it with plain aten pointwise ops for the
  dequantization (``(codes - zero_point) * scale + offset``), so the min-cut partitioner can
  save the low-bit codes for backward, and the codegen stage can fold the dequantization into
  a low-bit GEMM's epilogue.
* ``fqt::quantize_stochastic``: the same with stochastic rounding. Tagged
  ``nondeterministic_seeded``: it draws from torch's generator, so it is never recomputed,
  deduplicated or CSE'd (each draw must stay independent).
* ``fqt::bhq_quantize(x, spec, layout) -> (codes, scale, zero_point, offset, group, u, s)``:
  the block Householder quantizer: per-row codes of T x plus the O(N) description of T; and
  ``fqt::bhq_inverse(y, group, u, s, layout)``: T^-1 on the rows of the dequantized value. A
  GEMM on BHQ codes applies T^-1 to its output rows instead (T^-1 commutes with the GEMM).
* ``fqt::fake_quantize(x, spec, layout) -> x_hat``: quantize-dequantize in one op, for block
  scales and custom quantizers (no codes-plus-affine-scales form). Also tagged.

``spec`` is :meth:`QuantSpec.key` text and ``layout`` a :class:`Layout` value. The
implementations are the reference (``reference.py``); lowered graphs call the kernels of
``codegen`` instead.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from .errors import SpecError
from .bhq import bhq_inverse_ref, bhq_quantize_ref
from .layout import Layout, natural_2d_shape, scale_shape
from .reference import fake_quantize_ref, quantize_ref
from .specs import Granularity, QuantSpec, Transform

__all__ = [
    "quantize_op", "quantize_stochastic_op", "fake_quantize_op", "bhq_quantize_op", "bhq_inverse_op",
    "needs_fake_quantize", "quantize_fake", "QUANTIZE_OPS",
]


_OBSERVER: contextvars.ContextVar[list | None] = contextvars.ContextVar("fqt_quantizer_inputs", default=None)


@contextlib.contextmanager
def capture_quantizer_inputs():
    """Within this block, every stochastic quantization run by the reference ops records
    ``(input, spec, layout)``: the gradient tensors the quantizers actually see (statistics).
    Only graphs executed with the reference ops report (``execution="reference"``)."""
    seen: list = []
    token = _OBSERVER.set(seen)
    try:
        yield seen
    finally:
        _OBSERVER.reset(token)


def _observe(x: torch.Tensor, spec: str, layout: int) -> None:
    seen = _OBSERVER.get()
    if seen is not None and QuantSpec.from_key(spec).is_stochastic:
        seen.append((x.detach().clone(), QuantSpec.from_key(spec), Layout(layout)))


def needs_fake_quantize(spec: QuantSpec) -> bool:
    """Specs without a codes-plus-affine-scales form: block scales and custom quantizers go
    through ``fqt::fake_quantize``."""
    return spec.granularity is Granularity.BLOCK or spec.quantizer is not None


def in_input_layout(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous, ``x``'s shape) in ``x``'s memory order where that is a dense layout
    other than contiguous of a tensor of 3+ dims (a channels-last activation); ``t`` otherwise.

    A quantizer's output replaces ``x`` in the graph, whose later views were traced on ``x``'s
    strides: a channels-last activation quantized into contiguous codes made a convolution
    return another layout than traced, and a later ``view`` fail. 2-D GEMM operands keep
    contiguous codes (their memory order is chosen by the code-layout pass). Real ops and
    their fakes share this rule (``empty_in_input_layout``)."""
    if x.dim() < 3 or x.is_contiguous():
        return t
    like = torch.empty_like(x, dtype=t.dtype)  # x's strides where x is dense, else contiguous
    return t if like.stride() == t.stride() else like.copy_(t)


def empty_in_input_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fake twin of :func:`in_input_layout`: an empty tensor of ``x``'s shape and that layout."""
    return torch.empty_like(x, dtype=dtype) if x.dim() >= 3 else x.new_empty(x.shape, dtype=dtype)


def quantize_fake(x: torch.Tensor, spec: str, layout: int):
    """Fake implementation shared by every op returning (codes, scale, zero_point, offset)."""
    parsed = QuantSpec.from_key(spec)
    s_shape = scale_shape(x.shape, parsed.granularity, Layout(layout))
    sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    codes = empty_in_input_layout(x, parsed.code_dtype)
    return codes, x.new_empty(s_shape, dtype=sdt), x.new_empty(s_shape, dtype=sdt), x.new_empty(s_shape, dtype=sdt)


def _run_quantize(x: torch.Tensor, spec: str, layout: int, stochastic: bool):
    _observe(x, spec, layout)
    parsed = QuantSpec.from_key(spec)
    if parsed.is_stochastic != stochastic:
        op = "quantize_stochastic" if parsed.is_stochastic else "quantize"
        raise SpecError(f"spec {spec!r} has rounding={parsed.rounding.value}; use fqt::{op}")
    codes, scale, zp, offset = quantize_ref(x, parsed, Layout(layout))
    # custom ops may not return views or aliases of each other: materialise the broadcasts
    return (
        in_input_layout(x, codes.contiguous()), scale.contiguous().clone(), zp.contiguous().clone(), offset.contiguous().clone()
    )


@torch.library.custom_op("fqt::quantize", mutates_args=())
def _quantize(x: torch.Tensor, spec: str, layout: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_quantize(x, spec, layout, stochastic=False)


@torch.library.custom_op("fqt::quantize_stochastic", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _quantize_stochastic(
    x: torch.Tensor, spec: str, layout: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_quantize(x, spec, layout, stochastic=True)


_quantize.register_fake(quantize_fake)
_quantize_stochastic.register_fake(quantize_fake)


@torch.library.custom_op("fqt::fake_quantize", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _fake_quantize(x: torch.Tensor, spec: str, layout: int) -> torch.Tensor:
    _observe(x, spec, layout)
    # contiguous whatever x's memory order (channels-last, permuted, LAST layouts): the fake
    # declares exactly these strides, and Inductor checks them
    return in_input_layout(x, fake_quantize_ref(x, QuantSpec.from_key(spec), Layout(layout)).contiguous())


@_fake_quantize.register_fake
def _fake_quantize_fake(x: torch.Tensor, spec: str, layout: int) -> torch.Tensor:
    return empty_in_input_layout(x, x.dtype)


@torch.library.custom_op("fqt::bhq_quantize", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _bhq_quantize(
    x: torch.Tensor, spec: str, layout: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _observe(x, spec, layout)
    parsed = QuantSpec.from_key(spec)
    if parsed.transform is not Transform.BLOCK_HOUSEHOLDER:
        raise SpecError(f"fqt::bhq_quantize needs a spec with transform='bhq', got {spec!r}")
    out = bhq_quantize_ref(x, parsed, Layout(layout))
    return (in_input_layout(x, out[0].contiguous()), *(t.contiguous().clone() for t in out[1:]))


@_bhq_quantize.register_fake
def _bhq_quantize_fake(x: torch.Tensor, spec: str, layout: int):
    codes, scale, zp, offset = quantize_fake(x, spec, layout)
    n = natural_2d_shape(x.shape, Layout(layout))[0]
    sdt = scale.dtype
    return (
        codes, scale, zp, offset, x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=sdt), x.new_empty((n,), dtype=sdt)
    )


@torch.library.custom_op("fqt::bhq_inverse", mutates_args=())
def _bhq_inverse(y: torch.Tensor, group: torch.Tensor, u: torch.Tensor, s: torch.Tensor, layout: int) -> torch.Tensor:
    return in_input_layout(y, bhq_inverse_ref(y, group, u, s, Layout(layout)).contiguous())  # the strides its fake declares


@_bhq_inverse.register_fake
def _bhq_inverse_fake(y, group, u, s, layout):
    return empty_in_input_layout(y, y.dtype)


quantize_op = torch.ops.fqt.quantize.default
quantize_stochastic_op = torch.ops.fqt.quantize_stochastic.default
fake_quantize_op = torch.ops.fqt.fake_quantize.default
bhq_quantize_op = torch.ops.fqt.bhq_quantize.default
bhq_inverse_op = torch.ops.fqt.bhq_inverse.default
QUANTIZE_OPS = (quantize_op, quantize_stochastic_op)
