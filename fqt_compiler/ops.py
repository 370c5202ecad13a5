"""The ``fqt`` custom ops inserted into graphs, with fake (meta) implementations.

* ``fqt::quantize(x, spec, layout) -> (codes, scale, zero_point, offset)``: deterministic
  (round-to-nearest) quantization to low-bit codes. The passes follow it with plain aten
  pointwise ops for the dequantization, so the min-cut partitioner can save the low-bit codes
  for backward instead of the high-precision activation.
* ``fqt::fake_quantize(x, spec, layout) -> x_hat``: quantize-dequantize in one op, for
  stochastic rounding, transforms (BHQ) and block scales. Tagged ``nondeterministic_seeded``:
  it draws from torch's generator, so it must never be recomputed, deduplicated or CSE'd.

``spec`` is :meth:`QuantSpec.key` text and ``layout`` a :class:`Layout` value. The default
implementations delegate to ``reference.py``; the codegen stage swaps in kernels.
"""

from __future__ import annotations

import torch

from .reference import Layout, fake_quantize_ref, quantize_ref, scale_shape
from .specs import Granularity, QuantSpec, Rounding, Transform

__all__ = ["quantize_op", "fake_quantize_op", "needs_fake_quantize"]

_LIB = "fqt"


def needs_fake_quantize(spec: QuantSpec) -> bool:
    """Specs that cannot go through the codes-returning ``fqt::quantize`` op."""
    return (
        spec.rounding is Rounding.STOCHASTIC
        or spec.transform is not Transform.NONE
        or spec.granularity is Granularity.BLOCK
    )


@torch.library.custom_op(f"{_LIB}::quantize", mutates_args=())
def _quantize(x: torch.Tensor, spec: str, layout: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    parsed = QuantSpec.from_key(spec)
    codes, scale, zp, offset = quantize_ref(x, parsed, Layout(layout))
    # custom ops may not return views or aliases of each other: materialise the broadcasts
    return codes.contiguous(), scale.contiguous().clone(), zp.contiguous().clone(), offset.contiguous().clone()


@_quantize.register_fake
def _quantize_fake(x: torch.Tensor, spec: str, layout: int):
    parsed = QuantSpec.from_key(spec)
    s_shape = scale_shape(x.shape, parsed.granularity, Layout(layout))
    sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    codes = x.new_empty(x.shape, dtype=parsed.code_dtype)
    return codes, x.new_empty(s_shape, dtype=sdt), x.new_empty(s_shape, dtype=sdt), x.new_empty(s_shape, dtype=sdt)


@torch.library.custom_op(f"{_LIB}::fake_quantize", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _fake_quantize(x: torch.Tensor, spec: str, layout: int) -> torch.Tensor:
    return fake_quantize_ref(x, QuantSpec.from_key(spec), Layout(layout))


@_fake_quantize.register_fake
def _fake_quantize_fake(x: torch.Tensor, spec: str, layout: int) -> torch.Tensor:
    return torch.empty_like(x)


quantize_op = torch.ops.fqt.quantize.default
fake_quantize_op = torch.ops.fqt.fake_quantize.default
