"""The ``@triton.jit`` helpers fqt's kernels share, and that generated kernel source calls.

Public on purpose: the prologue- and epilogue-fused kernels are generated as source and import
these by their module path (``fqt_compiler.codegen.kernels.common``), so their names are part of
the generated code's contract. Each helper mirrors one step of the reference quantizers
(``fqt_compiler.grid``) or of torch's pointwise ops, operation for operation, so generated
kernels stay bit-exact against the references.
"""

import triton
import triton.language as tl

__all__ = [
    "rint", "hash_uniform", "load_seed", "bhq_rows", "empty_row_stats", "update_row_stats", "row_scales", "codes_tile",
    "given_stats", "given_row_stats", "store_partials", "tanh", "gelu_backward", "gelu_tanh_backward", "round_bf16", "round_fp16",
    "nd_offset",
]


@triton.jit
def rint(v):
    # round half to even (torch.round); exact for |v| < 2**22, far beyond any code range
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def nd_offset(idx, n1, n2, n3, t0, t1, t2, t3, DIMS: tl.constexpr):
    # The memory offset of flat index ``idx`` over DIMS dims (outermost first) of sizes
    # (-, n1, n2, n3) and strides (t0, t1, t2, t3): a leaf broadcast along some dims, or stored
    # in another memory order, is read where it lies instead of being copied to a matrix first.
    if DIMS == 1:
        off = idx * t0
    elif DIMS == 2:
        off = (idx // n1) * t0 + (idx % n1) * t1
    elif DIMS == 3:
        off = (idx // (n1 * n2)) * t0 + ((idx // n2) % n1) * t1 + (idx % n2) * t2
    else:
        off = (idx // (n1 * n2 * n3)) * t0 + ((idx // (n2 * n3)) % n1) * t1 + ((idx // n3) % n2) * t2 + (idx % n3) * t3
    return off


@triton.jit
def hash_uniform(seed, idx):
    # grid.hash_uniform's bits in 32-bit arithmetic: the reference masks every step to 32 bits,
    # and unsigned 32-bit integers wrap modulo 2**32 by themselves (half the instructions of
    # 64-bit multiplies on the GPU)
    h = idx.to(tl.uint32) + seed.to(tl.uint32) * 0x9E3779B9
    h = h ^ (h >> 16)
    h = h * 0x45D9F3B
    h = h ^ (h >> 16)
    h = h * 0x45D9F3B
    h = h ^ (h >> 16)
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def load_seed(seed_ptr, STOCHASTIC: tl.constexpr):
    """The stochastic-rounding seed (an int64 scalar); 0, and nothing read, for nearest
    rounding: its launchers then pass no seed tensor at all."""
    seed = 0
    if STOCHASTIC:
        seed = tl.load(seed_ptr).to(tl.int64)
    return seed


@triton.jit
def bhq_rows(x, proj_ptr, group, u2, s, cols, mask, stride_pg):
    # y = z - (2 u) proj[group] with z = s x: the order of reference BHQTransform.apply
    proj = tl.load(proj_ptr + group[:, None] * stride_pg + cols[None, :], mask=mask, other=0.0)
    return s[:, None] * x - u2[:, None] * proj


@triton.jit
def empty_row_stats(BLOCK_R: tl.constexpr):
    inf = tl.full((BLOCK_R,), float("inf"), tl.float32)
    return tl.zeros((BLOCK_R,), tl.float32), tl.zeros((BLOCK_R,), tl.float32), inf, -inf


@triton.jit
def update_row_stats(x, mask, nan, amax, mn, mx, SYMMETRIC: tl.constexpr):
    # per-row running statistics of one tile; NaN is tracked on its own because tl.max /
    # tl.min do not propagate it (torch's amax / amin in the reference do)
    nan = tl.maximum(nan, tl.max(tl.where(x != x, 1.0, 0.0), axis=1))
    if SYMMETRIC:
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    else:
        mn = tl.minimum(mn, tl.min(tl.where(mask, x, float("inf")), axis=1))
        mx = tl.maximum(mx, tl.max(tl.where(mask, x, float("-inf")), axis=1))
    return nan, amax, mn, mx


@triton.jit
def row_scales(nan, amax, mn, mx, SCHEME: tl.constexpr, QMAX: tl.constexpr, LEVELS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per-row scale / zero point / offset from the row statistics, in the reference's
    operation order; also what the codes need (min, grid zero, safe divisor, finiteness)."""
    is_nan = nan > 0
    qzero = tl.zeros((BLOCK_R,), tl.float32)
    if SCHEME == 0:
        amax = tl.where(is_nan, float("nan"), amax)
        scale = amax * (1.0 / QMAX)  # the reference's reciprocal product
        zp = tl.zeros((BLOCK_R,), tl.float32)
        offset = tl.zeros((BLOCK_R,), tl.float32)
    elif SCHEME == 1:
        mn = tl.where(is_nan, float("nan"), mn)
        mx = tl.where(is_nan, float("nan"), mx)
        scale = (mx * 0.5 - mn * 0.5) * (2.0 / LEVELS)  # the reference's halves: no overflow
        zp = tl.zeros((BLOCK_R,), tl.float32)
        offset = mn
    else:
        mn = tl.minimum(tl.where(is_nan, float("nan"), mn), 0.0)
        mx = tl.maximum(tl.where(is_nan, float("nan"), mx), 0.0)
        mn = tl.where(is_nan, float("nan"), mn)  # tl.minimum may drop NaN against 0
        mx = tl.where(is_nan, float("nan"), mx)
        span = (mx * 0.5 - mn * 0.5) * (2.0 / LEVELS)
        qzero = tl.floor(tl.math.div_rn(-mn, tl.where(span > 0, span, 1.0)))
        qzero = tl.where(mn < 0, tl.minimum(tl.maximum(qzero, 1.0), LEVELS * 1.0), 0.0)
        down = tl.where(qzero > 0, tl.math.div_rn(-mn, tl.where(qzero > 0, qzero, 1.0)), 0.0)
        up = tl.where(qzero < LEVELS, tl.math.div_rn(mx, tl.where(qzero < LEVELS, LEVELS - qzero, 1.0)), 0.0)
        finite_span = (span == span) & (tl.abs(span) != float("inf"))
        scale = tl.where(finite_span, tl.maximum(down, up), span)
        zp = qzero
        offset = tl.zeros((BLOCK_R,), tl.float32)
    safe = tl.where(scale > 0, scale, 1.0)
    scale_finite = (scale == scale) & (tl.abs(scale) != float("inf"))
    return scale, zp, offset, mn, qzero, safe, scale_finite


@triton.jit
def codes_tile(
    x, rows, cols, C, scale, zp, mn, qzero, safe, scale_finite, seed, code_ty: tl.constexpr,
    SCHEME: tl.constexpr, FP8: tl.constexpr, STOCHASTIC: tl.constexpr, QMAX: tl.constexpr, LEVELS: tl.constexpr,
    CODE_OFFSET: tl.constexpr, FP8_MANT: tl.constexpr, FP8_EMIN: tl.constexpr,
):
    """The codes of one tile ``x`` (rows x cols of the grouped matrix, C columns in all)."""
    if SCHEME == 0:
        v = tl.where(scale_finite[:, None], tl.math.div_rn(x, safe[:, None]), x * scale[:, None])
    elif SCHEME == 1:
        v = tl.math.div_rn(x - mn[:, None], safe[:, None])
    else:
        v = tl.math.div_rn(x, safe[:, None]) + qzero[:, None]
    # a constant group (scale 0) is its zero point (+0 for a symmetric grid, even for -0.0
    # inputs); a NaN scale passes through, as in the reference
    v = tl.where(scale[:, None] > 0, v, tl.where(scale_finite[:, None], zp[:, None], scale[:, None]))
    if STOCHASTIC:
        noise = hash_uniform(seed, rows[:, None].to(tl.int64) * C + cols[None, :])
    if FP8 != 0:
        # Round on the fp8 grid with exact power-of-two arithmetic, then cast values that
        # are already representable: the result does not depend on how a backend rounds
        # its fp32 -> fp8 conversion (Triton's CPU interpreter does not round to even).
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        v = tl.where(x != x, x, v)  # keep NaN through the clamp
        exponent = ((tl.abs(v).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        q_exp = tl.maximum(exponent, FP8_EMIN) - FP8_MANT
        quantum = ((q_exp + 127) << 23).to(tl.float32, bitcast=True)
        # times the exact reciprocal, not ``/``: on a GPU ``/`` is div.full.f32, an
        # approximation (up to 2 ulp) the interpreter does not reproduce
        per_quantum = ((127 - q_exp) << 23).to(tl.float32, bitcast=True)
        if STOCHASTIC:
            lo = tl.floor(v * per_quantum) * quantum
            hi = tl.minimum(lo + quantum, QMAX)
            width = hi - lo
            p_hi = tl.where(width > 0, tl.math.div_rn(v - lo, tl.where(width > 0, width, 1.0)), 0.0)
            grid = tl.where(noise < p_hi, hi, lo)
        else:
            grid = rint(v * per_quantum) * quantum
        # a value that rounds to zero keeps its sign, as torch's cast writes it (-0 is 0x80):
        # the arithmetic above makes +0 of a small negative value
        signed_zero = (v.to(tl.uint32, bitcast=True) & 0x80000000).to(tl.float32, bitcast=True)
        grid = tl.where(grid == 0, signed_zero, grid)
        if FP8 == 1:
            bits = grid.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        else:
            bits = grid.to(tl.float8e5).to(tl.uint8, bitcast=True)
        # NaN as the exact bit pattern torch writes (0x7F), not whatever a conversion makes
        bits = tl.where(v != v, 0x7F, bits).to(tl.uint8)
        if FP8 == 1:
            code = bits.to(tl.float8e4nv, bitcast=True)
        else:
            code = bits.to(tl.float8e5, bitcast=True)
    else:
        if STOCHASTIC:
            q = tl.floor(v + noise)
        else:
            q = rint(v)
        q_nan = q != q  # before the clamp: min/max may drop NaN
        if SCHEME == 0:
            q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        else:
            q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0) + CODE_OFFSET
        code = tl.where(q_nan, 0.0, q).to(code_ty)
    return code


@triton.jit
def given_stats(stats_ptr, SCHEME: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per-tensor statistics computed beforehand, broadcast to every row of the block."""
    nan, amax, mn, mx = empty_row_stats(BLOCK_R)
    if SCHEME == 0:
        amax = tl.zeros((BLOCK_R,), tl.float32) + tl.load(stats_ptr)
        nan = tl.zeros((BLOCK_R,), tl.float32) + tl.load(stats_ptr + 1)
    else:
        mn = tl.zeros((BLOCK_R,), tl.float32) + tl.load(stats_ptr)
        mx = tl.zeros((BLOCK_R,), tl.float32) + tl.load(stats_ptr + 1)
        nan = tl.zeros((BLOCK_R,), tl.float32) + tl.load(stats_ptr + 2)
    return nan, amax, mn, mx


@triton.jit
def given_row_stats(stats_ptr, rows, rmask, SCHEME: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per-row statistics computed beforehand (by a GEMM epilogue), three floats per row:
    [amax, nan, -] (symmetric) or [min, max, nan]."""
    nan, amax, mn, mx = empty_row_stats(BLOCK_R)
    if SCHEME == 0:
        amax = tl.load(stats_ptr + rows * 3, mask=rmask, other=0.0)
        nan = tl.load(stats_ptr + rows * 3 + 1, mask=rmask, other=0.0)
    else:
        mn = tl.load(stats_ptr + rows * 3, mask=rmask, other=0.0)
        mx = tl.load(stats_ptr + rows * 3 + 1, mask=rmask, other=0.0)
        nan = tl.load(stats_ptr + rows * 3 + 2, mask=rmask, other=0.0)
    return nan, amax, mn, mx


@triton.jit
def store_partials(out_ptr, pid, nan, amax, mn, mx, SYMMETRIC: tl.constexpr):
    """One program's [amax, nan] (symmetric) or [min, max, nan] over its rows."""
    if SYMMETRIC:
        tl.store(out_ptr + pid * 2, tl.max(amax, axis=0))
        tl.store(out_ptr + pid * 2 + 1, tl.max(nan, axis=0))
    else:
        tl.store(out_ptr + pid * 3, tl.min(mn, axis=0))
        tl.store(out_ptr + pid * 3 + 1, tl.max(mx, axis=0))
        tl.store(out_ptr + pid * 3 + 2, tl.max(nan, axis=0))


@triton.jit
def tanh(x):
    # tanh through exp of a non-positive argument (no overflow); the sign restored after
    e = tl.exp(-2.0 * tl.abs(x))
    t = tl.math.div_rn(1.0 - e, 1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def gelu_backward(g, x):
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return g * (cdf + x * pdf)


@triton.jit
def gelu_tanh_backward(g, x):
    k = 0.7978845608028654
    inner = k * (x + 0.044715 * x * x * x)
    t = tanh(inner)
    left = 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
    return g * (0.5 * (1.0 + t) + left)


@triton.jit
def round_bf16(x):
    # fp32 -> nearest-even bf16, kept in fp32, in integer arithmetic: exact on every backend
    # (a cast's rounding mode is the backend's; Triton's interpreter truncates)
    bits = x.to(tl.uint32, bitcast=True)
    r = ((bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def round_fp16(x):
    # fp32 -> nearest-even fp16, kept in fp32: round on the fp16 grid of x's binade (a power-of-
    # two quantum, subnormals from 2**-24), overflow to +-inf past the largest finite value
    exponent = ((tl.abs(x).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    quantum = ((tl.maximum(exponent, -14) - 10 + 127) << 23).to(tl.float32, bitcast=True)
    r = rint(tl.math.div_rn(x, quantum)) * quantum
    r = tl.where(tl.abs(r) > 65504.0, x * float("inf"), r)
    return tl.where(x != x, x, r)
