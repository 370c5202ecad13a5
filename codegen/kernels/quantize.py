"""Quantize kernels: per-tensor / per-row / per-column scales, symmetric, asymmetric (min-max)
and zero-on-grid schemes, nearest or stochastic rounding, int codes of 2-8 bits and fp8.

The math is ``fqt_compiler.grid.quantize_grouped`` step for step (same operation order,
IEEE division through ``div_rn``, round-half-to-even), so a kernel's output equals
``reference.quantize_ref`` bit for bit given the same seed. Stochastic rounding hashes
``(seed, i)`` where ``i`` is the element's index in the *grouped* order the reference uses
(row-major over the scale groups), exactly as ``grid.hash_uniform`` does.

Columns are handled by the rows kernel on the transposed view (free: only strides change);
per-tensor scales by a partial min/max kernel, a tiny torch reduction, and the rows kernel
with the statistics given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fqt_compiler.grid import draw_seed

from fqt_compiler.layout import Layout, from_natural_2d, natural_2d, shape_scale
from fqt_compiler.specs import ElementFormat, Granularity, QuantSpec, Scheme, Transform

from fqt_compiler.codegen.kernels.launch import launch
from fqt_compiler.codegen.kernels.common import (
    bhq_rows, codes_tile, empty_row_stats, given_stats, load_seed, row_scales, store_partials, update_row_stats,
)

__all__ = [
    "quantize", "SCHEME_ID", "quantize_rows_kernel", "row_statistics", "reduce_partials", "rows_kernel_for", "rows_grid",
    "rows_tiling", "store_row_scales", "ONE_PASS_MAX_C", "PLAIN_ONE_PASS_MAX_C", "TWO_PASS_TILES", "WAVE_PROGRAMS",
]

SCHEME_ID = {Scheme.SYMMETRIC: 0, Scheme.ASYMMETRIC: 1, Scheme.ZERO_ON_GRID: 2}


@triton.jit
def _minmax_partials_kernel(
    # pointers
    x_ptr, out_ptr,
    # sizes
    R, C,
    # strides
    stride_xr, stride_xc,
    # meta-parameters
    SYMMETRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-program [amax, nan] (symmetric) or [min, max, nan] partials over BLOCK_R rows."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    nan, amax, mn, mx = empty_row_stats(BLOCK_R)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        nan, amax, mn, mx = update_row_stats(x, mask, nan, amax, mn, mx, SYMMETRIC)
    store_partials(out_ptr, pid, nan, amax, mn, mx, SYMMETRIC)


@triton.jit
def quantize_rows_kernel(
    # pointers: input, outputs (codes, one scale / zero point / offset per row), given
    # per-tensor statistics, the random seed; BHQ only: per-row group / u / s and the group
    # projections proj[g] = sum over the group's rows of u * s * x
    x_ptr, codes_ptr, scale_ptr, zp_ptr, offset_ptr, stats_ptr, seed_ptr,
    group_ptr, u_ptr, s_ptr, proj_ptr,
    # sizes of the (grouped) matrix: one scale per row
    R, C,
    # strides of the input, of the codes, of proj
    stride_xr, stride_xc, stride_cr, stride_cc, stride_pg,
    # with PERMUTED, a row's column j (memory order) is the natural column
    # (j % perm_inner) * perm_outer + j // perm_inner: the random stream's index
    perm_inner, perm_outer,
    # meta-parameters
    SCHEME: tl.constexpr,  # 0 symmetric, 1 asymmetric, 2 zero-on-grid
    FP8: tl.constexpr,  # 0 int codes, 1 e4m3, 2 e5m2
    STOCHASTIC: tl.constexpr,
    STATS_GIVEN: tl.constexpr,  # per-tensor: statistics come from stats_ptr, not from the row
    QMAX: tl.constexpr,  # symmetric grid half-width (fp8: largest finite value)
    LEVELS: tl.constexpr,  # B = 2**bits - 1
    CODE_OFFSET: tl.constexpr,  # stored code = level + CODE_OFFSET
    FP8_MANT: tl.constexpr,  # fp8 mantissa bits (3 for e4m3, 2 for e5m2)
    FP8_EMIN: tl.constexpr,  # fp8 smallest normal exponent (-6 / -14)
    TRANSFORM: tl.constexpr,  # BHQ: quantize y = s x - 2 u proj[group] instead of x
    ONE_PASS: tl.constexpr,  # the row fits one BLOCK_C tile: the input is read once
    PERMUTED: tl.constexpr,  # rows read in another order than the natural one (channels-last)
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    t_group, t_u2, t_s = 0, 0.0, 0.0  # BHQ's per-row description, read only with TRANSFORM
    if TRANSFORM:
        t_group = tl.load(group_ptr + rows, mask=rmask, other=0)
        t_u2 = 2.0 * tl.load(u_ptr + rows, mask=rmask, other=0.0)
        t_s = tl.load(s_ptr + rows, mask=rmask, other=0.0)

    if ONE_PASS:  # the row fits one tile: read once, statistics and codes from the same registers
        cols = tl.arange(0, BLOCK_C).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        if TRANSFORM:
            x = bhq_rows(x, proj_ptr, t_group, t_u2, t_s, cols, mask, stride_pg)
        nan, amax, mn, mx = empty_row_stats(BLOCK_R)
        if STATS_GIVEN:
            nan, amax, mn, mx = given_stats(stats_ptr, SCHEME, BLOCK_R)
        else:
            nan, amax, mn, mx = update_row_stats(x, mask, nan, amax, mn, mx, SCHEME == 0)
        scale, zp, offset, mn, qzero, safe, scale_finite = row_scales(nan, amax, mn, mx, SCHEME, QMAX, LEVELS, BLOCK_R)
        store_row_scales(scale_ptr, zp_ptr, offset_ptr, rows, rmask, scale, zp, offset, CODE_OFFSET)
        code = codes_tile(x, rows, natural_cols(cols, perm_inner, perm_outer, STOCHASTIC and PERMUTED), C, scale, zp, mn,
                          qzero, safe, scale_finite, load_seed(seed_ptr, STOCHASTIC), codes_ptr.dtype.element_ty, SCHEME, FP8,
                          STOCHASTIC, QMAX, LEVELS, CODE_OFFSET, FP8_MANT, FP8_EMIN)
        tl.store(codes_ptr + rows[:, None] * stride_cr + cols[None, :] * stride_cc, code, mask=mask)
    else:
        _two_passes(
            x_ptr, codes_ptr, scale_ptr, zp_ptr, offset_ptr, stats_ptr, seed_ptr, proj_ptr, rows, rmask, t_group, t_u2, t_s,
            C, stride_xr, stride_xc, stride_cr, stride_cc, stride_pg, perm_inner, perm_outer, SCHEME, FP8, STOCHASTIC,
            STATS_GIVEN, QMAX, LEVELS, CODE_OFFSET, FP8_MANT, FP8_EMIN, TRANSFORM, STOCHASTIC and PERMUTED, BLOCK_R, BLOCK_C,
        )


@triton.jit
def natural_cols(cols, perm_inner, perm_outer, PERMUTED: tl.constexpr):
    """The natural column of each memory-order column of a row (the index the random stream
    is drawn at), in 32-bit arithmetic: a row holds fewer than 2**31 elements."""
    if PERMUTED:
        c = cols.to(tl.int32)
        return ((c % perm_inner) * perm_outer + c // perm_inner).to(tl.int64)
    return cols


@triton.jit
def _two_passes(
    x_ptr, codes_ptr, scale_ptr, zp_ptr, offset_ptr, stats_ptr, seed_ptr, proj_ptr, rows, rmask, t_group, t_u2, t_s,
    C, stride_xr, stride_xc, stride_cr, stride_cc, stride_pg, perm_inner, perm_outer,
    SCHEME: tl.constexpr, FP8: tl.constexpr, STOCHASTIC: tl.constexpr, STATS_GIVEN: tl.constexpr, QMAX: tl.constexpr,
    LEVELS: tl.constexpr, CODE_OFFSET: tl.constexpr, FP8_MANT: tl.constexpr, FP8_EMIN: tl.constexpr,
    TRANSFORM: tl.constexpr, PERMUTED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Rows longer than a tile: the statistics over BLOCK_C-wide chunks, then the codes."""
    # ---- pass 1: row statistics (NaN tracked separately: tl.max does not propagate it)
    nan, amax, mn, mx = empty_row_stats(BLOCK_R)
    if STATS_GIVEN:
        nan, amax, mn, mx = given_stats(stats_ptr, SCHEME, BLOCK_R)
    else:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = rmask[:, None] & (cols < C)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
            if TRANSFORM:
                x = bhq_rows(x, proj_ptr, t_group, t_u2, t_s, cols, mask, stride_pg)
            nan, amax, mn, mx = update_row_stats(x, mask, nan, amax, mn, mx, SCHEME == 0)
    scale, zp, offset, mn, qzero, safe, scale_finite = row_scales(nan, amax, mn, mx, SCHEME, QMAX, LEVELS, BLOCK_R)
    store_row_scales(scale_ptr, zp_ptr, offset_ptr, rows, rmask, scale, zp, offset, CODE_OFFSET)
    seed = load_seed(seed_ptr, STOCHASTIC)

    # ---- pass 2: codes
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        if TRANSFORM:
            x = bhq_rows(x, proj_ptr, t_group, t_u2, t_s, cols, mask, stride_pg)
        code = codes_tile(x, rows, natural_cols(cols, perm_inner, perm_outer, PERMUTED), C, scale, zp, mn, qzero, safe,
                          scale_finite, seed, codes_ptr.dtype.element_ty, SCHEME, FP8, STOCHASTIC, QMAX, LEVELS, CODE_OFFSET,
                          FP8_MANT, FP8_EMIN)
        tl.store(codes_ptr + rows[:, None] * stride_cr + cols[None, :] * stride_cc, code, mask=mask)


@triton.jit
def store_row_scales(scale_ptr, zp_ptr, offset_ptr, rows, rmask, scale, zp, offset, CODE_OFFSET: tl.constexpr):
    tl.store(scale_ptr + rows, scale, mask=rmask)
    tl.store(zp_ptr + rows, zp + CODE_OFFSET, mask=rmask)
    tl.store(offset_ptr + rows, offset, mask=rmask)


# A row of at most this many elements is quantized from one tile held on chip (one read of the
# input); longer rows take two passes over chunks. The plain quantizer holds up to
# PLAIN_ONE_PASS_MAX_C (16 warps, 124 registers and no spills on sm_90); a generated kernel's
# fused chain keeps more values per element alive, so it stops at ONE_PASS_MAX_C.
ONE_PASS_MAX_C = 4096
PLAIN_ONE_PASS_MAX_C = 16384
# Two-pass chunks (rows, columns) for long rows on a GPU. The first H200 run had only 16x64
# chunks: 119 registers a thread at 4 warps on sm_90, 2 KB loaded per step, and the kernel
# reached a quarter of copy bandwidth. Wide chunks suit rows contiguous in memory; tall narrow
# ones a transposed read, where a column's elements are what lie side by side.
TWO_PASS_TILES = ((1, 1024), (2, 1024), (4, 512), (16, 64))
# Programs that keep every SM of a large GPU busy for two waves (an H200 has 132 SMs): a tile
# height that leaves fewer programs than this idles SMs on a memory-bound kernel.
WAVE_PROGRAMS = 264


def rows_tiling(
    n_cols: int, device: torch.device, one_pass_max: int | None = None, n_rows: int | None = None,
    col_stride: int = 1,
) -> tuple[list[triton.Config], int | None, bool]:
    """(configs, BLOCK_C, one pass) for rows of ``n_cols`` elements: the whole row in one tile
    up to ``one_pass_max`` (default :data:`ONE_PASS_MAX_C`; the configs pick tile heights and
    warps), else two passes over chunks whose shape the configs pick (BLOCK_C is then None:
    it is the config's). One config under the CPU interpreter.

    On a GPU, given ``n_rows`` (and the input's ``col_stride``), the tile shape is chosen by
    rule and the autotuner chooses among warp counts only: the kernel is memory-bound, and
    every config is one more compile and one more benchmark per shape at a network's first
    step (a ResNet-50 step quantizes some 90 distinct shapes: every tile shape a candidate was
    over 600 benchmarks and about 230 compiles). The rule: the tallest one-pass tile that still gives
    :data:`WAVE_PROGRAMS` programs (else the shortest), wide chunks for contiguous rows, tall
    ones for a transposed read. Without ``n_rows`` every candidate is returned."""
    one_pass = n_cols <= (ONE_PASS_MAX_C if one_pass_max is None else one_pass_max)
    cuda = device.type == "cuda"
    if not one_pass:
        tiles = TWO_PASS_TILES if cuda else ((16, 64),)
        if cuda and n_rows is not None:
            tall = [t for t in TWO_PASS_TILES if t[0] >= 16]
            wide = sorted(t for t in TWO_PASS_TILES if t[1] >= 1024)
            tiles = tall[:1] if col_stride != 1 else [_tallest(wide, n_rows)]
        warps = (4, 8) if cuda else (4,)
        return [triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w) for r, c in tiles for w in warps], None, False
    block_c = max(16, triton.next_power_of_2(n_cols))
    if not cuda:
        return [triton.Config({"BLOCK_R": max(1, min(16, 1024 // block_c))})], block_c, True
    heights = [r for r in (1, 2, 4, 8, 16) if 256 <= r * block_c <= 8192] or [1]
    if n_rows is not None:
        heights = [_tallest([(r, block_c) for r in heights], n_rows)[0]]
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r in heights for w in _warps(r * block_c)], block_c, True


def _tallest(tiles, n_rows: int) -> tuple[int, int]:
    """The tallest of ``tiles`` (ascending heights) leaving :data:`WAVE_PROGRAMS` programs over
    ``n_rows`` rows, else the shortest."""
    fit = [t for t in tiles if triton.cdiv(n_rows, t[0]) >= WAVE_PROGRAMS]
    return fit[-1] if fit else tiles[0]


def _warps(tile: int) -> tuple[int, ...]:
    """Warp counts for a one-pass tile of ``tile`` elements: at most 32 elements a thread
    (a 16384-wide row takes 16 warps; at 8 it needs 218 registers a thread on sm_90)."""
    return (4, 8) if tile <= 4096 else (8, 16) if tile <= 8192 else (16,)


_ROWS_TUNED: dict[tuple, object] = {}


def rows_kernel_for(
    n_cols: int, device: torch.device, kernel=None, one_pass_max: int | None = None, n_rows: int | None = None,
    col_stride: int = 1,
) -> tuple[object, dict]:
    """A rows kernel (``quantize_rows_kernel``, or a generated fused one) autotuned over
    :func:`rows_tiling`'s configs for ``n_rows`` rows of ``n_cols`` (read ``col_stride`` apart);
    returns it and the tiling constants its launch passes (``ONE_PASS``, and ``BLOCK_C`` where
    the configs do not choose it)."""
    kernel = kernel if kernel is not None else quantize_rows_kernel
    configs, block_c, one_pass = rows_tiling(n_cols, device, one_pass_max, n_rows, col_stride)
    shapes = tuple((tuple(sorted(c.kwargs.items())), c.num_warps) for c in configs)
    key = (kernel, str(device), block_c, one_pass, shapes)
    if key not in _ROWS_TUNED:
        # the input's column stride too: a transposed read wants another chunk shape
        names = [n for n in ("R", "C", "STOCHASTIC", "TRANSFORM", "STATS_GIVEN", "stride_xc") if n in kernel.arg_names]
        _ROWS_TUNED[key] = triton.autotune(configs=configs, key=names)(kernel)
    return _ROWS_TUNED[key], {"ONE_PASS": one_pass} | ({} if block_c is None else {"BLOCK_C": block_c})


def rows_grid(n_rows: int):
    """The rows kernel's grid for the tile height the autotuner picks."""
    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_R"]),)

    return grid


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    layout: Layout = Layout.DIM0,
    *,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Triton twin of ``reference.quantize_ref``: codes (x's shape) and the scale, zero point and
    offset. ``seed`` (an int64 tensor of one element) drives stochastic rounding; by default it
    is drawn from torch's generator."""
    # check
    if spec.transform is not Transform.NONE:
        raise ValueError(f"the quantize kernel handles specs without transforms (BHQ: kernels.bhq), not {spec.short()}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the quantize kernel takes fp32/fp16/bf16 inputs, got {x.dtype}")
    # allocate: codes in the natural layout, handed back as a view in x's layout; a
    # channels-last tensor with one scale per sample (or per tensor) is read and written in its
    # own memory order instead (a copy to the natural order and back was two more passes)
    cl = _channels_last_rows(x, spec, layout)
    if cl is not None:
        m, codes_cl, perm = cl
        codes_nat = codes_cl.view(m.shape)
    else:
        m, perm = natural_2d(x, layout), None
        codes_nat = torch.empty(m.shape, dtype=spec.code_dtype, device=x.device)
    n_nat, c_nat = m.shape
    g, c2 = _grouped_rows(m, codes_nat, spec)
    n_rows = g.shape[0]
    scale, zp, offset = row_statistics(n_rows, spec, x.device, written=x.numel() > 0)
    if seed is None and spec.is_stochastic:
        seed = draw_seed(x.device)
    per_tensor = spec.granularity is Granularity.TENSOR
    if x.numel():
        stats = _tensor_stats(g, spec) if per_tensor else None
        _launch_rows(g, c2, scale, zp, offset, stats, seed, spec, stats_given=per_tensor, perm=perm)
    if spec.granularity is Granularity.BLOCK:
        codes_nat.copy_(c2.reshape(n_nat, -1).narrow(1, 0, c_nat))
        stats_out = [t.reshape(n_nat, -1) for t in (scale, zp, offset)]
    else:
        keep = 1 if per_tensor else n_rows  # per tensor: every row stored the same numbers
        scale, zp, offset = (t.narrow(0, 0, keep) for t in (scale, zp, offset))
        stats_out = [shape_scale(t, x.shape, spec.granularity, layout) for t in (scale, zp, offset)]
    codes = codes_cl.movedim(-1, 1) if cl is not None else from_natural_2d(codes_nat, x.shape, layout)
    return (codes, *stats_out)


def _channels_last_rows(x: torch.Tensor, spec: QuantSpec, layout: Layout) -> tuple | None:
    """For a channels-last (N, C, *spatial) ``x`` quantized per sample or per tensor: its rows in
    memory order (a view), codes allocated channels-last, and the permutation (C, spatial size)
    that maps a memory-order column to its natural one (the random stream's index). None where
    the natural matrix is the way (any other layout, scale or memory order)."""
    if layout is not Layout.DIM0 or spec.granularity not in (Granularity.ROW, Granularity.TENSOR) or x.dim() < 3:
        return None
    spatial = 1
    for d in x.shape[2:]:
        spatial *= d
    if x.numel() == 0 or x.is_contiguous() or not x.movedim(1, -1).is_contiguous() or x.shape[1] * spatial >= 2**31:
        return None
    rows_cl = x.movedim(1, -1)
    codes_cl = torch.empty(rows_cl.shape, dtype=spec.code_dtype, device=x.device)
    return rows_cl.reshape(x.shape[0], x.shape[1] * spatial), codes_cl, (x.shape[1], spatial)


def row_statistics(n_rows: int, spec: QuantSpec, device: torch.device, written: bool) -> tuple[torch.Tensor, ...]:
    """The per-row scale, zero point and offset of a rows kernel (at least one row). Left
    empty where the kernel runs (``written``) and writes every row; otherwise filled as the
    reference leaves the statistics of an empty group (scale 0, the code offset as zero point
    where the scheme has one)."""
    if written:
        return tuple(torch.empty(n_rows, dtype=torch.float32, device=device) for _ in range(3))
    scale = torch.zeros(max(n_rows, 1), dtype=torch.float32, device=device)
    zp = torch.full_like(scale, 0.0 if spec.scheme is Scheme.SYMMETRIC else float(spec.code_offset))
    return scale, zp, torch.zeros_like(scale)


def _grouped_rows(m: torch.Tensor, codes: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The natural matrix ``m`` and where its codes go, viewed so each row shares one scale."""
    if spec.granularity is Granularity.BLOCK:
        # one scale per run of block_size along a row: the rows kernel on a (rows x blocks,
        # block) view; a ragged last block is padded with the row's first element, as the
        # reference does, and the padding's codes are dropped again
        n = spec.block_size
        pad = (-m.shape[1]) % n
        g = torch.cat([m, m.narrow(1, 0, 1).expand(m.shape[0], pad)], dim=1) if pad else m.contiguous()
        g = g.reshape(-1, n)
        return g, torch.empty(g.shape, dtype=spec.code_dtype, device=m.device)
    # columns: the rows kernel on the transposed views (free: only strides change)
    return (m.t(), codes.t()) if spec.granularity is Granularity.COLUMN else (m, codes)


def _tensor_stats(g: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-tensor statistics of ``g`` (max |x|, or min and max; then the NaN flag): partial
    min / max per block of rows in one kernel, reduced by torch."""
    sym = spec.scheme is Scheme.SYMMETRIC
    n_rows, n_cols = g.shape
    n_prog = triton.cdiv(n_rows, 16)
    partials = torch.empty(n_prog, 2 if sym else 3, dtype=torch.float32, device=g.device)
    launch(
        _minmax_partials_kernel, (n_prog,), g, partials, n_rows, n_cols, g.stride(0), g.stride(1),
        SYMMETRIC=sym, BLOCK_R=16, BLOCK_C=64,
    )
    return reduce_partials(partials, sym)


def reduce_partials(partials: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Per-program [amax, nan] (symmetric) or [min, max, nan] partials reduced to the tensor's."""
    # torch reductions propagate NaN like the reference's amin/amax
    first = partials.select(1, 0)
    parts = [first.amax()] if symmetric else [first.amin(), partials.select(1, 1).amax()]
    return torch.stack([*parts, partials.select(1, -1).amax()])


def _launch_rows(g, codes, scale, zp, offset, stats, seed, spec: QuantSpec, stats_given: bool,
                 perm: tuple[int, int] | None = None) -> None:
    """The rows kernel over ``g`` (one scale per row), writing ``codes`` and the statistics;
    ``perm``: (inner, outer) of rows read in memory order (``_channels_last_rows``)."""
    fp8 = {ElementFormat.FP8_E4M3: 1, ElementFormat.FP8_E5M2: 2}.get(spec.format, 0)
    n_rows, n_cols = g.shape
    kernel, tiling = rows_kernel_for(n_cols, g.device, one_pass_max=PLAIN_ONE_PASS_MAX_C, n_rows=n_rows,
                                     col_stride=g.stride(1))
    launch(
        kernel, rows_grid(n_rows),
        g, codes, scale, zp, offset, stats, seed,
        None, None, None, None,  # BHQ inputs: unused here
        n_rows, n_cols,
        g.stride(0), g.stride(1), codes.stride(0), codes.stride(1), 0, *(perm or (1, 1)),
        SCHEME=SCHEME_ID[spec.scheme], FP8=fp8, STOCHASTIC=spec.is_stochastic, STATS_GIVEN=stats_given,
        QMAX=float(spec.qmax), LEVELS=spec.levels, CODE_OFFSET=spec.code_offset,
        FP8_MANT=3 if fp8 == 1 else 2, FP8_EMIN=-6 if fp8 == 1 else -14,
        TRANSFORM=False, PERMUTED=perm is not None, **tiling,
    )
