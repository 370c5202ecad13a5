"""Block Householder quantizer (BHQ) kernels: the transform fused into the per-row quantize.

The grouping (row ranges, sort, leader/small-row split, cube-root scales) is O(N) bookkeeping
done with torch ops on the device (``fqt_compiler.bhq.bhq_transform``, no host round trip).
The O(N*D) work is two launches:

1. ``_group_projection_kernel``: proj[g] = sum over the rows r of group g of u_r * (s_r * x_r),
   rows visited in increasing index order (the summation order of the reference's index_add);
2. the row-quantize kernel of ``quantize.py`` with its BHQ prologue: each row of
   y = s x - 2 u proj[group] is formed on the fly in both of its passes, never stored.

The inverse, T^-1 z = (z - 2 u proj'[group]) / s with proj'[g] = sum of u_r z_r, is the same
projection kernel plus ``_reflect_kernel``. Twins: ``bhq_quantize_ref`` / ``bhq_inverse_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fqt_compiler.bhq import group_counts, bhq_transform
from fqt_compiler.grid import draw_seed
from fqt_compiler.layout import Layout, from_natural_2d, natural_2d, shape_scale
from fqt_compiler.specs import Granularity, QuantSpec, Transform

from fqt_compiler.codegen.kernels.launch import launch
from fqt_compiler.codegen.kernels.quantize import SCHEME_ID, rows_grid, rows_kernel_for

__all__ = ["bhq_quantize", "bhq_inverse"]


@triton.jit
def _group_projection_kernel(
    # pointers: the matrix, the output projections, rows sorted by group, group starts, u, s
    x_ptr, proj_ptr, order_ptr, starts_ptr, u_ptr, s_ptr,
    # sizes
    D,
    # strides
    stride_xr, stride_xc, stride_pg,
    # meta-parameters
    SCALED: tl.constexpr,  # multiply each row by s first (forward transform) or not (inverse)
    BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(starts_ptr + g)
    end = tl.load(starts_ptr + g + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(start, end):
        r = tl.load(order_ptr + i)
        z = tl.load(x_ptr + r * stride_xr + cols * stride_xc, mask=cmask, other=0.0).to(tl.float32)
        if SCALED:
            z = tl.load(s_ptr + r) * z
        acc = acc + tl.load(u_ptr + r) * z
    tl.store(proj_ptr + g * stride_pg + cols, acc, mask=cmask)


@triton.jit
def _reflect_kernel(
    # pointers
    z_ptr, out_ptr, proj_ptr, group_ptr, u_ptr, s_ptr,
    # sizes
    R, D,
    # strides
    stride_zr, stride_zc, stride_or, stride_oc, stride_pg,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols < D)[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_zr + cols[None, :] * stride_zc, mask=mask, other=0.0).to(tl.float32)
    group = tl.load(group_ptr + rows, mask=rmask, other=0)
    u2 = 2.0 * tl.load(u_ptr + rows, mask=rmask, other=0.0)
    s = tl.load(s_ptr + rows, mask=rmask, other=1.0)
    proj = tl.load(proj_ptr + group[:, None] * stride_pg + cols[None, :], mask=mask, other=0.0)
    out = tl.math.div_rn(z - u2[:, None] * proj, s[:, None])  # reference: _reflect(y) / s
    tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_oc, out, mask=mask)


def _projections(m: torch.Tensor, group: torch.Tensor, u: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    n, d = m.shape
    order = torch.sort(group, stable=True).indices
    starts = torch.zeros(n + 1, dtype=torch.int64, device=m.device)
    starts.narrow(0, 1, n).copy_(torch.cumsum(group_counts(group, n), 0))
    proj = torch.empty((n, d), dtype=torch.float32, device=m.device)
    launch(
        _group_projection_kernel, (n, triton.cdiv(d, 64)),
        m, proj, order, starts, u, s, d, m.stride(0), m.stride(1), proj.stride(0), SCALED=s is not None, BLOCK_D=64,
    )
    return proj


def bhq_quantize(
    x: torch.Tensor, spec: QuantSpec, layout: Layout = Layout.DIM0, *, seed: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Triton twin of ``fqt_compiler.bhq.bhq_quantize_ref``."""
    # check
    if spec.transform is not Transform.BLOCK_HOUSEHOLDER or spec.format.is_float:
        raise ValueError(f"bhq_quantize needs an integer spec with transform='bhq', got {spec.short()}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the BHQ kernel takes fp32/fp16/bf16 inputs, got {x.dtype}")
    # allocate
    m = natural_2d(x, layout).to(torch.float32)
    n, d = m.shape
    t = bhq_transform(m)
    group, u, s = t.group, t.u.to(torch.float32), t.scale.to(torch.float32)
    codes = torch.empty((n, d), dtype=spec.code_dtype, device=x.device)
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    zp, offset = torch.empty_like(scale), torch.empty_like(scale)
    if seed is None and spec.is_stochastic:
        seed = draw_seed(x.device)
    # launch
    if x.numel():
        proj = _projections(m, group, u, s)
        row_spec = spec.with_(transform=Transform.NONE, granularity=Granularity.ROW)
        kernel, tiling = rows_kernel_for(d, x.device, n_rows=n, col_stride=m.stride(1))
        launch(
            kernel, rows_grid(n),
            m, codes, scale, zp, offset, None, seed,
            group, u, s, proj,
            n, d,
            m.stride(0), m.stride(1), codes.stride(0), codes.stride(1), proj.stride(0), 1, 1,
            SCHEME=SCHEME_ID[row_spec.scheme], FP8=0, STOCHASTIC=row_spec.is_stochastic, STATS_GIVEN=False,
            QMAX=float(row_spec.qmax), LEVELS=row_spec.levels, CODE_OFFSET=row_spec.code_offset,
            FP8_MANT=3, FP8_EMIN=-6, TRANSFORM=True, PERMUTED=False, **tiling,
        )
    stats = [shape_scale(v, x.shape, Granularity.ROW, layout) for v in (scale, zp, offset)]
    return (from_natural_2d(codes, x.shape, layout), *stats, group, u, s)


def bhq_inverse(
    y: torch.Tensor, group: torch.Tensor, u: torch.Tensor, s: torch.Tensor, layout: Layout = Layout.DIM0
) -> torch.Tensor:
    """Triton twin of ``fqt_compiler.bhq.bhq_inverse_ref`` (fp32 math, y's dtype out)."""
    m = natural_2d(y, layout).to(torch.float32)
    n, d = m.shape
    out = torch.empty((n, d), dtype=torch.float32, device=y.device)
    if y.numel():
        u, s = u.to(torch.float32), s.to(torch.float32)
        proj = _projections(m, group, u, None)
        launch(
            _reflect_kernel, (triton.cdiv(n, 16), triton.cdiv(d, 64)),
            m, out, proj, group, u, s, n, d, m.stride(0), m.stride(1), out.stride(0), out.stride(1), proj.stride(0),
            BLOCK_R=16, BLOCK_D=64,
        )
    return from_natural_2d(out, y.shape, layout).to(y.dtype)


