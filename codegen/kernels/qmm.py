"""Low-bit GEMM: int8 x int8 -> int32 (or fp8 x fp8 -> fp32) with the dequantization fused
into the epilogue: per-row A scales x per-column B scales, zero-point corrections from row and
column sums accumulated in the K loop, offsets, bias, output dtype.

Reference twin: ``fqt_compiler.reference.qmm_ref`` (same arguments, same epilogue order).
"""

from __future__ import annotations

import enum

import torch
import triton
import triton.language as tl

from fqt_compiler.grid import QOperand
from fqt_compiler.codegen.kernels.launch import launch

__all__ = [
    "qmm", "qmm_kernel", "qmm_tile", "qmm_split_kernel", "qmm_split_reduce_kernel", "tile_indices", "accumulate",
    "dequantize_tile", "autotune_configs", "tuned", "family", "split_k", "EVEN_K", "FP8_PROMOTE_K", "FP8_DTYPES", "Family",
    "SM90_TILES",
]

# The most K elements an fp8 tile accumulates in the tensor cores' reduced-precision fp8
# accumulator before its sum is added to a full fp32 accumulator (``max_num_imprecise_acc`` of
# ``tl.dot``; on sm_90 Triton's default is never). Every autotune entry has BLOCK_K <= this and
# the kernel promotes once per K tile: 128 is the interval of the fp8 training recipes that
# measured fp32-level accuracy this way, at one fp32 add per accumulator element per tile.
FP8_PROMOTE_K = 128
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Family(enum.Enum):
    """Which GEMM kernel a tile list is for: register pressure differs (fp8's promoted
    accumulator, a generated epilogue's chain), and a tile that spills registers loses."""

    INT8 = "int8"
    INT8_AFFINE = "int8 zero points"  # int8 with zero points: row and column sums in the K loop
    FP8 = "fp8"
    EPILOGUE = "epilogue"  # the generated epilogue-fused kernels, int8 or fp8


# sm_90 tiles (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) that assemble without register spills
# (ptxas of the Triton that ships, `fqt_compiler.tools.ptx.spill_table`, checked by
# tests/kernels/test_qmm_kernel.py): fp8's 128 x 256 tile spills 540 bytes per thread; every
# 128-row tile of an epilogue-fused kernel spills 2-20 KB with a GELU chain and statistics.
SM90_TILES = {
    Family.INT8: [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
                  (64, 128, 128, 4, 4)],
    # the row and column sums of zero-point GEMMs spill 80-584 bytes in the other int8 tiles
    Family.INT8_AFFINE: [(128, 128, 128, 4, 8), (64, 128, 128, 4, 4)],
    Family.FP8: [(256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4), (64, 128, 128, 4, 4)],
    Family.EPILOGUE: [(64, 128, 128, 4, 8), (64, 64, 128, 3, 8)],
}


def autotune_configs(device: torch.device, family: Family = Family.INT8) -> list[triton.Config]:
    """Tile configurations: the spill-free sm_90 list of ``family`` on Hopper, a safe default
    on other GPUs, one small tile under the CPU interpreter."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        shapes = SM90_TILES[family]
    elif device.type == "cuda":
        shapes = [(128, 128, 64, 3, 8), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
    else:  # the CPU interpreter: one small tile
        shapes = [(32, 32, 32, 1, 1)]
    if any(bk > FP8_PROMOTE_K for _, _, bk, _, _ in shapes):
        raise ValueError(f"qmm: a K tile above FP8_PROMOTE_K={FP8_PROMOTE_K} would accumulate fp8 longer in low precision")
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=w)
        for bm, bn, bk, st, w in shapes
    ]


@triton.jit
def tile_indices(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns of this program's output tile, tiles visited in groups of GROUP_M rows
    for L2 reuse (the Triton matmul tutorial's ordering)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M), pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def accumulate(
    a_ptr, b_ptr, rm, rn, M, N, K, k_lo, k_hi, stride_am, stride_ak, stride_bk, stride_bn,
    IS_INT: tl.constexpr, AFFINE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The tile's products over K in [k_lo, k_hi): int32 (exact) or fp32, and with AFFINE the
    A row sums and B column sums the zero-point corrections need. Rows and columns past the
    matrix wrap around (their results are never stored): no load masks but K's, and none with
    EVEN_K (every K tile full), which keeps the asynchronous copies unpredicated."""
    rm_in = rm % M
    rn_in = rn % N
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    if IS_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rsa = tl.zeros((BLOCK_M,), dtype=tl.int32)
    csb = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        a_ptrs = a_ptr + rm_in[:, None] * stride_am + kk[None, :] * stride_ak
        b_ptrs = b_ptr + kk[:, None] * stride_bk + rn_in[None, :] * stride_bn
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        elif IS_INT:
            a = tl.load(a_ptrs, mask=(kk < k_hi)[None, :], other=0)
            b = tl.load(b_ptrs, mask=(kk < k_hi)[:, None], other=0)
        else:  # fp8: the padding value must be a float for the fp8 cast
            a = tl.load(a_ptrs, mask=(kk < k_hi)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=(kk < k_hi)[:, None], other=0.0)
        if IS_INT:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            if AFFINE:
                rsa += tl.sum(a.to(tl.int32), axis=1)
                csb += tl.sum(b.to(tl.int32), axis=0)
        else:
            # fp8 on sm_90: the tensor cores' fp8 accumulator keeps fewer bits than fp32 and
            # Triton's default never promotes it; promoting once per K tile (BLOCK_K <= 128
            # elements, see FP8_PROMOTE_K) keeps long-K backward GEMMs at fp32 accuracy
            acc = tl.dot(a, b, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)
    return acc, rsa, csb


@triton.jit
def dequantize_tile(
    acc, rsa, csb, rm, rn, sa_ptr, sb_ptr, za_ptr, zb_ptr, oa_ptr, ob_ptr, bias_ptr, M, N, K, stride_sa, stride_sb,
    AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """The accumulator dequantized to fp32, in the order of reference.qmm_ref."""
    sa = tl.load(sa_ptr + rm * stride_sa, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn * stride_sb, mask=rn < N, other=0.0)
    if AFFINE:
        za = tl.load(za_ptr + rm * stride_sa, mask=rm < M, other=0.0).to(tl.int32)
        zb = tl.load(zb_ptr + rn * stride_sb, mask=rn < N, other=0.0).to(tl.int32)
        oa = tl.load(oa_ptr + rm * stride_sa, mask=rm < M, other=0.0)
        ob = tl.load(ob_ptr + rn * stride_sb, mask=rn < N, other=0.0)
        t1 = acc - za[:, None] * csb[None, :] - zb[None, :] * rsa[:, None] + K * za[:, None] * zb[None, :]
        t2 = (rsa - K * za).to(tl.float32)
        t3 = (csb - K * zb).to(tl.float32)
        out = (t1.to(tl.float32) * sa[:, None]) * sb[None, :]
        out = out + (sa[:, None] * ob[None, :]) * t2[:, None]
        out = out + (oa[:, None] * sb[None, :]) * t3[None, :]
        out = out + (K * oa[:, None]) * ob[None, :]
    else:
        out = (acc.to(tl.float32) * sa[:, None]) * sb[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def qmm_tile(
    a_ptr, b_ptr, sa_ptr, sb_ptr, za_ptr, zb_ptr, oa_ptr, ob_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_sa, stride_sb,
    IS_INT: tl.constexpr, AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """This program's output tile, dequantized (fp32), and its row / column indices: shared by
    the plain kernel and the generated epilogue-fused ones."""
    rm, rn = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rsa, csb = accumulate(a_ptr, b_ptr, rm, rn, M, N, K, 0, K, stride_am, stride_ak, stride_bk, stride_bn,
                               IS_INT, AFFINE, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    out = dequantize_tile(acc, rsa, csb, rm, rn, sa_ptr, sb_ptr, za_ptr, zb_ptr, oa_ptr, ob_ptr, bias_ptr, M, N, K,
                          stride_sa, stride_sb, AFFINE, HAS_BIAS)
    return out, rm, rn


@triton.jit
def qmm_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, za_ptr, zb_ptr, oa_ptr, ob_ptr, bias_ptr,
    # sizes
    M, N, K,
    # strides (statistics: 0 for a per-tensor value, 1 for one per row / column)
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, stride_sa, stride_sb,
    # meta-parameters
    IS_INT: tl.constexpr,  # int8 codes (exact int32 accumulation) or fp8 (fp32)
    AFFINE: tl.constexpr,  # zero points / offsets present: accumulate row and column sums
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K a multiple of BLOCK_K (set by a heuristic): no load masks at all
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    out, rm, rn = qmm_tile(
        a_ptr, b_ptr, sa_ptr, sb_ptr, za_ptr, zb_ptr, oa_ptr, ob_ptr, bias_ptr, M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_sa, stride_sb,
        IS_INT, AFFINE, HAS_BIAS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def qmm_split_kernel(
    a_ptr, b_ptr, ws_ptr,
    M, N, K, K_PER,
    stride_am, stride_ak, stride_bk, stride_bn, stride_wk, stride_wm,
    IS_INT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Split-K, part 1: program (tile, s) accumulates K in [s K_PER, (s + 1) K_PER) and stores
    its raw accumulator in workspace slice s (K_PER a multiple of every BLOCK_K)."""
    rm, rn = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_lo = tl.program_id(1) * K_PER
    k_hi = tl.minimum(K, k_lo + K_PER)
    acc, _, _ = accumulate(a_ptr, b_ptr, rm, rn, M, N, K, k_lo, k_hi, stride_am, stride_ak, stride_bk, stride_bn,
                           IS_INT, False, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    ws = ws_ptr + tl.program_id(1).to(tl.int64) * stride_wk + rm[:, None] * stride_wm + rn[None, :]
    tl.store(ws, acc, mask=mask)


@triton.jit
def qmm_split_reduce_kernel(
    ws_ptr, out_ptr, sa_ptr, sb_ptr, bias_ptr,
    M, N, K, SPLIT,
    stride_wk, stride_wm, stride_om, stride_on, stride_sa, stride_sb,
    IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split-K, part 2: the slices summed in order (exactly, for int32) and dequantized like
    the unsplit kernel's epilogue."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if IS_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(ws_ptr + s * stride_wk + rm[:, None] * stride_wm + rn[None, :], mask=mask, other=0)
    out = dequantize_tile(acc, acc, acc, rm, rn, sa_ptr, sb_ptr, None, None, None, None, bias_ptr, M, N, K,
                          stride_sa, stride_sb, False, HAS_BIAS)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, out.to(out_ptr.dtype.element_ty), mask=mask)


def family(is_int: bool, affine: bool) -> Family:
    """The tile family of a plain (not epilogue-fused) GEMM."""
    if not is_int:
        return Family.FP8
    return Family.INT8_AFFINE if affine else Family.INT8


_TUNED: dict[tuple, object] = {}

#: Sets EVEN_K after the autotuner picked BLOCK_K (a heuristic under the autotuner runs per config).
EVEN_K = {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0}


def tuned(kernel, device: torch.device, family: Family):
    """``kernel`` autotuned over ``family``'s :func:`autotune_configs` for ``device``, with
    EVEN_K set per config."""
    key = (kernel, str(device), family)
    if key not in _TUNED:
        names = [n for n in ("M", "N", "K", "IS_INT", "AFFINE") if n in kernel.arg_names]
        _TUNED[key] = triton.autotune(configs=autotune_configs(device, family), key=names)(triton.heuristics(EVEN_K)(kernel))
    return _TUNED[key]


# Split-K: the K range of a long-K GEMM with few output tiles (a weight gradient: 768 x 768
# outputs are 36 tiles of 128 x 128 for 132 SMs on an H200) is split over that many more
# programs. Every slice is a multiple of the largest BLOCK_K, so each config keeps whole tiles.
SPLIT_K_GRAIN = 128
SPLIT_K_MAX = 16
SPLIT_K_MIN_K = 4096  # below this the second pass and the workspace cost more than they give


def split_k(m: int, n: int, k: int, device: torch.device, affine: bool) -> int:
    """How many K slices a GEMM of this shape gets: 1 (no split) unless its output has fewer
    128 x 128 tiles than half the device's SMs and K is long; never for zero-point GEMMs (their
    row and column sums would need splitting too) or on the CPU interpreter."""
    if affine or device.type != "cuda" or k < SPLIT_K_MIN_K:
        return 1
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, 128)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if 2 * tiles > sms:
        return 1
    return max(1, min(SPLIT_K_MAX, sms // tiles, k // (8 * SPLIT_K_GRAIN)))


def _stat(t: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, int]:
    """A per-tensor or per-row/column statistic as a contiguous fp32 vector and its stride
    (None stays None: the kernel never reads an absent statistic)."""
    if t is None:
        return None, 0
    t = t.to(torch.float32).reshape(-1).contiguous()
    if t.numel() == 1:
        return t, 0
    if t.numel() != n:
        raise ValueError(f"qmm: a scale/zero-point/offset has {t.numel()} values; expected 1 or {n}")
    return t, 1


def _affine_stats(zp: torch.Tensor | None, offset: torch.Tensor | None, n: int, stride: int, like: torch.Tensor):
    """An affine operand's zero point and offset as the kernel reads them, at its scale's
    stride: a missing one (a zero-point-only or offset-only scheme) becomes zeros."""
    out = []
    for t in (zp, offset):
        v, _ = _stat(t, n)
        if v is None:
            v = torch.zeros(n if stride else 1, dtype=torch.float32, device=like.device)
        elif stride and v.numel() == 1:
            v = v.expand(n).contiguous()
        out.append(v)
    return out


def epilogue_operands(qa: QOperand, qb: QOperand, bias: torch.Tensor | None):
    """The dequantization epilogue's inputs as the kernels take them: fp32 vectors with a
    stride of 0 (per tensor) or 1, every statistic of one operand sharing its scale's stride,
    None where the kernel reads nothing (no zero points or offsets, no bias); returns
    (sa, sb, za, zb, oa, ob, bias, sa_stride, sb_stride, affine)."""
    a, a_scale, a_zp, a_offset = qa
    b, b_scale, b_zp, b_offset = qb
    m, n = a.shape[0], b.shape[1]
    sa, sa_stride = _stat(a_scale, m)
    sb, sb_stride = _stat(b_scale, n)
    if sa is None or sb is None:
        raise ValueError("qmm: both operands need a scale")
    affine = any(t is not None for t in (a_zp, a_offset, b_zp, b_offset))
    za = oa = zb = ob = None
    if affine:
        za, oa = _affine_stats(a_zp, a_offset, m, sa_stride, a)
        zb, ob = _affine_stats(b_zp, b_offset, n, sb_stride, a)
    bias_t = bias.contiguous() if bias is not None else None
    return sa, sb, za, zb, oa, ob, bias_t, sa_stride, sb_stride, affine


def qmm(
    a: QOperand, b: QOperand, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32, *,
    split: int | None = None,
) -> torch.Tensor:
    """Triton twin of ``reference.qmm_ref``. ``split``: K slices (split-K); by default
    :func:`split_k` decides from the shape and the device."""
    a_codes, b_codes = a.codes, b.codes
    # check
    if a_codes.dim() != 2 or b_codes.dim() != 2 or a_codes.shape[1] != b_codes.shape[0]:
        raise ValueError(f"qmm: shapes {tuple(a_codes.shape)} @ {tuple(b_codes.shape)} do not form a 2-D GEMM")
    both_int = a_codes.dtype == b_codes.dtype == torch.int8
    if not both_int and not (a_codes.dtype in FP8_DTYPES and b_codes.dtype in FP8_DTYPES):
        raise TypeError(
            f"qmm: codes must be int8 or fp8 (both int8, or e4m3 / e5m2 in any pair), got {a_codes.dtype} and {b_codes.dtype}"
        )
    m, k = a_codes.shape
    n = b_codes.shape[1]
    # allocate
    out = torch.empty((m, n), dtype=out_dtype, device=a_codes.device)
    sa, sb, za, zb, oa, ob, bias_t, sa_stride, sb_stride, affine = epilogue_operands(a, b, bias)
    if m == 0 or n == 0:
        return out
    # launch
    slices = split if split is not None else split_k(m, n, k, a_codes.device, affine)
    is_int = a_codes.dtype == torch.int8
    if slices > 1:
        if affine:
            raise ValueError("qmm: split-K needs GEMMs without zero points or offsets")
        _launch_split(a_codes, b_codes, out, sa, sb, bias_t, sa_stride, sb_stride, slices)
        return out

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch(
        tuned(qmm_kernel, a_codes.device, family(is_int, affine)), grid,
        a_codes, b_codes, out, sa, sb, za, zb, oa, ob, bias_t,
        m, n, k,
        a_codes.stride(0), a_codes.stride(1), b_codes.stride(0), b_codes.stride(1), out.stride(0), out.stride(1),
        sa_stride, sb_stride,
        IS_INT=is_int, AFFINE=affine, HAS_BIAS=bias is not None,
    )
    return out


def _launch_split(a, b, out, sa, sb, bias, sa_stride: int, sb_stride: int, slices: int) -> None:
    """Split-K: the slices' raw accumulators into a workspace, then one pass summing and
    dequantizing them."""
    (m, k), n = a.shape, b.shape[1]
    per = max(1, triton.cdiv(triton.cdiv(k, slices), SPLIT_K_GRAIN)) * SPLIT_K_GRAIN
    slices = max(1, triton.cdiv(k, per))
    is_int = a.dtype == torch.int8
    ws = torch.empty((slices, m, n), dtype=torch.int32 if is_int else torch.float32, device=a.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), slices)

    launch(
        tuned(qmm_split_kernel, a.device, Family.INT8 if is_int else Family.FP8), grid,
        a, b, ws, m, n, k, per, a.stride(0), a.stride(1), b.stride(0), b.stride(1), ws.stride(0), ws.stride(1),
        IS_INT=is_int,
    )
    launch(
        qmm_split_reduce_kernel, (triton.cdiv(m, 64), triton.cdiv(n, 64)),
        ws, out, sa, sb, bias, m, n, k, slices, ws.stride(0), ws.stride(1), out.stride(0), out.stride(1),
        sa_stride, sb_stride, IS_INT=is_int, HAS_BIAS=bias is not None, BLOCK_M=64, BLOCK_N=64,
    )
