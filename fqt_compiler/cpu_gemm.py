"""The CPU bodies of the low-bit GEMM ops (``fqt::qmm``, ``fqt::qbmm``): exact int32 sums of the
int8 codes (``int8_gemm``), then the reference's dequantization epilogue, so that they equal
``reference.qmm_ref`` / ``qbmm_ref`` bit for bit. Graphs Inductor compiles for the CPU trace
these functions in place of the ops (``codegen/inline.py``), so the epilogue fuses with the ops
around it."""

from __future__ import annotations

import torch

from .grid import QOperand
from .int8_gemm import exact_bmm, int8_bmm, int8_mm
from .reference import dequantize_accumulator, qbmm_ref, qmm_ref

__all__ = ["int8_product", "qmm_cpu", "qbmm_cpu"]


def int8_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of (M, K) and (K, N) int8 codes as exact int32 sums.

    ``torch._int_mm`` on the CPU misreads the stride of a size-1 dim (a (1, 32) operand with
    strides (1, 1) -- a transposed one-column weight -- came back as garbage, no error), and
    Inductor hands it such views. A GEMM with a dim of 1 (a Linear with one input or one output
    feature, a single row) is a matrix-vector product, where the int8 kernel gains nothing: it
    sums broadcast int32 products instead, exactly."""
    if a.shape[0] > 1 and a.shape[1] > 1 and b.shape[1] > 1:
        return int8_mm(a, b)
    return (a.to(torch.int32).unsqueeze(2) * b.to(torch.int32).unsqueeze(0)).sum(1, dtype=torch.int32)


def qmm_cpu(a: QOperand, b: QOperand, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``reference.qmm_ref`` with the int8 product exact in int32 (``int8_gemm.int8_mm``:
    ``torch._int_mm``, or fp32 units where this CPU multiplies int8 slowly); same numbers."""
    if a.codes.dtype != torch.int8:
        return qmm_ref(a, b, bias, out_dtype)
    # int64 keeps the zero-point terms exact; the reference holds the same integers in fp64
    acc = int8_product(a.codes, b.codes)
    if a.zero_point is not None or b.zero_point is not None:
        acc = acc.to(torch.int64)
    return dequantize_accumulator(acc, a, b, bias, out_dtype)


def qbmm_cpu(a: QOperand, b: QOperand, out_dtype: torch.dtype, *, traced: bool = False) -> torch.Tensor:
    """``reference.qbmm_ref`` with the int8 product exact in int32; same numbers. Run eagerly
    (the op's body) the product is ``int8_gemm.int8_bmm``: ``torch._int_mm`` per batch entry
    where int8 GEMMs are fast and entries are at least 16 x 16, else exact fp32 GEMMs of the
    codes. ``traced`` (the trace Inductor compiles in place of the op): always the batched
    GEMMs on fp32 units, which Inductor calls as library GEMMs with no Python in between (a
    ``torch._int_mm`` per entry would be a node per entry, or a Python call)."""
    if a.codes.dtype != torch.int8 or b.codes.dtype != torch.int8:
        return qbmm_ref(a, b, out_dtype)
    acc = _traceable_bmm(a.codes, b.codes) if traced else int8_bmm(a.codes, b.codes)
    if a.zero_point is not None or b.zero_point is not None:
        acc = acc.to(torch.int64)  # the zero-point terms exact, as the reference's fp64 holds them
    return dequantize_accumulator(acc, a, b, None, out_dtype)


def _traceable_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 sums of a batched int8 product as plain torch GEMMs: fp32 in exact chunks of
    K (``int8_gemm.exact_bmm``) where K is a static size; where it is symbolic (a contraction
    over a dynamic sequence length) one fp64 GEMM, exact for any K below 2**39, so the trace
    holds for every size without a guard on K."""
    if isinstance(a.shape[2], int):
        return exact_bmm(a, b)
    return torch.bmm(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)
