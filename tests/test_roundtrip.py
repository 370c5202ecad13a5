"""Every format and scheme dequantizes its own codes to within half a step (nearest rounding):
the check that catches a wrong zero point or code offset in any storage container."""

from __future__ import annotations

import pytest
import torch

from fqt_compiler.grid import dequantize_ref

from fqt_compiler.layout import Layout

from fqt_compiler.reference import quantize_ref
from fqt_compiler.specs import QuantSpec

SPECS = [
    QuantSpec(format=f, scheme=s, bits=b, granularity=g)
    for f, s in (("int", "sym"), ("int", "asym"), ("int", "zog"), ("uint", "asym"), ("uint", "zog"))
    for b in (2, 4, 8)
    for g in ("tensor", "row", "column")
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short().replace(" ", "-"))
def test_codes_dequantize_within_half_a_step(spec):
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(1)) * 3 + 1
    codes, scale, zp, offset = quantize_ref(x, spec, Layout.DIM0)
    err = (dequantize_ref(codes, scale, zp, offset, torch.float32) - x).abs()
    assert (err <= 0.5 * scale * (1 + 1e-5) + 1e-6).all()
    lo, hi = (-spec.qmax, spec.qmax) if spec.scheme.value == "sym" else (spec.code_offset, spec.code_offset + spec.levels)
    assert codes.min() >= lo and codes.max() <= hi
