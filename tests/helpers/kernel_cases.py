"""Cases the kernel tests share: GEMM operand pairs, and the bitwise comparison of quantizer
outputs against the reference."""

from __future__ import annotations

import torch

from fqt_compiler.grid import QOperand
from fqt_compiler.layout import Layout
from fqt_compiler.reference import quantize_ref
from fqt_compiler.specs import QuantSpec

__all__ = ["PAIRS", "qmm_operands", "op_args", "to_cpu", "assert_same"]

PAIRS = {
    "int8-sym-row": (QuantSpec(granularity="row"), QuantSpec(granularity="row")),
    "paper-asym-zog-tensor": (QuantSpec(scheme="asym"), QuantSpec(scheme="zog")),
    "int4-asym-row": (QuantSpec(scheme="asym", granularity="row", bits=4), QuantSpec(scheme="asym", granularity="row")),
    "sym-tensor-x-zog-row": (QuantSpec(), QuantSpec(scheme="zog", granularity="row", bits=5)),
}


def qmm_operands(m, k, n, a_spec, b_spec, device):
    """Quantized operands of an m x k by k x n GEMM (A per row, B per column) with a bias:
    the qmm arguments (two QOperands and the bias), and the reference quantizations they came from."""
    g = torch.Generator().manual_seed(m * 100 + n)
    x = torch.randn(m, k, generator=g).to(device) * 2 + 0.5
    w = torch.randn(n, k, generator=g).to(device)
    qa = quantize_ref(x, a_spec, Layout.PENULTIMATE)  # per row of A
    qb = quantize_ref(w.t(), b_spec, Layout.LAST)  # per column of B = per row of W
    affine = a_spec.scheme.value != "sym" or b_spec.scheme.value != "sym"
    a_op = QOperand(qa[0], qa[1], qa[2] if affine else None, qa[3] if affine else None)
    b_op = QOperand(qb[0], qb[1], qb[2] if affine else None, qb[3] if affine else None)
    bias = torch.randn(n, generator=g).to(device)
    return (a_op, b_op, bias), (qa, qb)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def assert_same(kernel_out, ref_out):
    """Bitwise equal; NaN statistics must be NaN on both sides (torch.equal says NaN != NaN)."""
    for k, r, name in zip(kernel_out, ref_out, ("codes", "scale", "zero_point", "offset")):
        assert k.shape == r.shape, name
        assert k.dtype == r.dtype, name
        k, r = k.cpu(), r.cpu()
        if k.dtype.is_floating_point and k.element_size() > 1:
            assert torch.equal(k.isnan(), r.isnan()), name
            k, r = torch.nan_to_num(k, nan=0.0), torch.nan_to_num(r, nan=0.0)
        assert torch.equal(_bits(k), _bits(r)), name


def op_args(args: tuple) -> tuple:
    """``fqt::qmm``'s flat arguments (codes, scale, zero point, offset of each operand, then the
    bias) from ``(a, b, bias)``."""
    a, b, bias = args
    return (*a, *b, bias)


def to_cpu(args: tuple) -> tuple:
    """``(a, b, bias)`` with every tensor on the CPU."""
    def move(t):
        return t.cpu() if isinstance(t, torch.Tensor) else t

    a, b, bias = args
    return QOperand(*map(move, a)), QOperand(*map(move, b)), move(bias)
