"""Batched low-bit GEMM: ``qmm``'s tile loop and epilogue per entry of a (B, M, K) @ (B, K, N)
batch, the batch on the grid's second axis. Each entry's statistics are read at the batch
entry's offset, with a batch stride of 0 where they are shared by the batch (a per-tensor
scale, or a per-column one of rows folded over the batch).

Reference twin: ``fqt_compiler.reference.qbmm_ref`` (same arguments, same epilogue order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fqt_compiler.grid import QOperand
from fqt_compiler.reference import check_qbmm
from fqt_compiler.codegen.kernels.launch import launch
from fqt_compiler.codegen.kernels.qmm import FP8_DTYPES, accumulate, dequantize_tile, family, tile_indices, tuned

__all__ = ["qbmm", "qbmm_kernel", "MAX_GRID_BATCH"]

# CUDA's limit on the grid's second axis: a larger batch is launched in slices of this many
MAX_GRID_BATCH = 65535


@triton.jit
def qbmm_kernel(
    a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, za_ptr, zb_ptr, oa_ptr, ob_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_on,
    # statistics: (batch, row) and (batch, column) strides, 0 where a value is shared
    stride_sab, stride_sa, stride_sbb, stride_sb,
    IS_INT: tl.constexpr, AFFINE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    rm, rn = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rsa, csb = accumulate(a_ptr + batch * stride_ab, b_ptr + batch * stride_bb, rm, rn, M, N, K, 0, K,
                               stride_am, stride_ak, stride_bk, stride_bn, IS_INT, AFFINE, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    a_off = batch * stride_sab
    b_off = batch * stride_sbb
    if AFFINE:
        out = dequantize_tile(acc, rsa, csb, rm, rn, sa_ptr + a_off, sb_ptr + b_off, za_ptr + a_off, zb_ptr + b_off,
                              oa_ptr + a_off, ob_ptr + b_off, None, M, N, K, stride_sa, stride_sb, True, False)
    else:
        out = dequantize_tile(acc, rsa, csb, rm, rn, sa_ptr + a_off, sb_ptr + b_off, None, None, None, None, None,
                              M, N, K, stride_sa, stride_sb, False, False)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    o = out_ptr + batch * stride_ob + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=mask)


def _operand_stats(op: QOperand, batch: int, n: int, axis: int, affine: bool):
    """One operand's scale, zero point and offset as (batch or 1, n or 1) contiguous fp32 matrices
    of one common shape (absent ones as zeros where the kernel reads them), and its (batch,
    element) strides. ``axis``: -2 for A (one per row), -1 for B (one per column)."""
    stats = [op.scale] + ([op.zero_point, op.offset] if affine else [])
    mats = []
    for t in stats:
        if t is None:
            mats.append(None)
            continue
        t = t.to(torch.float32)
        if t.numel() == 1:
            mats.append(t.reshape(1, 1))
        else:
            mats.append(t.reshape(t.shape[0], t.shape[axis]))
    rows = max(m.shape[0] for m in mats if m is not None)
    cols = max(m.shape[1] for m in mats if m is not None)
    out = []
    for m in mats:
        if m is None:
            m = torch.zeros((1, 1), dtype=torch.float32, device=op.codes.device)
        out.append(m.expand(rows, cols).contiguous())
    strides = (cols if rows > 1 else 0, 1 if cols > 1 else 0)
    return out + [None] * (3 - len(out)), strides


def qbmm(a: QOperand, b: QOperand, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton twin of ``reference.qbmm_ref``."""
    check_qbmm(a, b)
    a_codes, b_codes = a.codes, b.codes
    both_int = a_codes.dtype == b_codes.dtype == torch.int8
    if not both_int and not (a_codes.dtype in FP8_DTYPES and b_codes.dtype in FP8_DTYPES):
        raise TypeError(
            f"qbmm: codes must be int8 or fp8 (both int8, or e4m3 / e5m2 in any pair), got {a_codes.dtype} and {b_codes.dtype}"
        )
    if a.scale is None or b.scale is None:
        raise ValueError("qbmm: both operands need a scale")
    batch, m, k = a_codes.shape
    n = b_codes.shape[2]
    out = torch.empty((batch, m, n), dtype=out_dtype, device=a_codes.device)
    if batch == 0 or m == 0 or n == 0:
        return out
    affine = any(t is not None for t in (a.zero_point, a.offset, b.zero_point, b.offset))
    (sa, za, oa), (sab, sam) = _operand_stats(a, batch, m, -2, affine)
    (sb, zb, ob), (sbb, sbn) = _operand_stats(b, batch, n, -1, affine)
    kernel = tuned(qbmm_kernel, a_codes.device, family(both_int, affine))
    for b0 in range(0, batch, MAX_GRID_BATCH):
        count = min(MAX_GRID_BATCH, batch - b0)

        def grid(meta, count=count):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), count)

        # a slice's statistics start at its first entry (or stay shared: batch stride 0)
        launch(
            kernel, grid,
            a_codes[b0:], b_codes[b0:], out[b0:],
            sa[b0:] if sab else sa, sb[b0:] if sbb else sb,
            (za[b0:] if sab else za) if affine else None, (zb[b0:] if sbb else zb) if affine else None,
            (oa[b0:] if sab else oa) if affine else None, (ob[b0:] if sbb else ob) if affine else None,
            m, n, k,
            a_codes.stride(0), a_codes.stride(1), a_codes.stride(2), b_codes.stride(0), b_codes.stride(1), b_codes.stride(2),
            out.stride(0), out.stride(1), out.stride(2), sab, sam, sbb, sbn,
            IS_INT=both_int, AFFINE=affine,
        )
    return out
