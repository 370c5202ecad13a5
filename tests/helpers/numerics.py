"""Numerical helpers for the quantizer tests: exact and Monte-Carlo variance, error bounds.

Everything here is written from docs/quantizers.md, not from the library's internals, except that the
per-group scale / zero point / offset (and the BHQ transform) are *read* from the library's
outputs (``quantize_ref`` and ``bhq_transform``) so that the formulas are evaluated at exactly the
grid the library used.

Conventions (public :func:`fqt_compiler.quantize`): rows are dim 0, the rest is flattened.

* Stochastic rounding of a scalar with pre-rounding value ``v`` on a grid of step ``step``:
  ``f = v - floor(v)``, ``Var = f (1 - f) step**2`` (docs/quantizers.md §3.1).
* BHQ: ``X_hat = T^-1 Q_row(T X)``, so the per-entry variance of X_hat is
  ``sum_j (T^-1)_ij**2 * Var(Q_row(Y)_jd)`` and the total is
  ``sum_j ||T^-1 e_j||**2 * sum_d f_jd (1 - f_jd) step_j**2`` (docs/quantizers.md §3.5, §6 claim 2).
"""

from __future__ import annotations

import math

import torch

import fqt_compiler
from fqt_compiler.bhq import BHQTransform, bhq_transform
from fqt_compiler.reference import quantize_ref
from fqt_compiler.specs import Granularity, QuantSpec, Transform

__all__ = [
    "as_2d",
    "fp8_grid",
    "row_spec_of",
    "bhq_parts",
    "exact_entry_variance",
    "exact_variance",
    "error_bound",
    "mc_draws",
    "mc_variance",
    "mc_variance_se",
    "paper_activation_fake_quant",
    "paper_weight_fake_quant",
    "spec_id",
]


def spec_id(spec: QuantSpec) -> str:
    """Readable pytest id for a spec, e.g. ``uint4-asym-row-SR-BHQ``."""
    return spec.short().replace(" ", "-")


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """The public quantizer's natural matrix: rows are dim 0 (``x.view(N, -1)``)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], -1)


def fp8_grid(dtype: torch.dtype) -> torch.Tensor:
    """All finite values of an fp8 dtype, sorted ascending, in float64 (both zeros collapse)."""
    vals = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype).to(torch.float64)
    vals = vals[vals.isfinite()]
    return torch.unique(vals)  # sorted


def row_spec_of(spec: QuantSpec) -> QuantSpec:
    """The per-row quantizer BHQ applies in the transformed space."""
    return spec.with_(transform=Transform.NONE, granularity=Granularity.ROW)


def bhq_parts(x: torch.Tensor) -> tuple[BHQTransform, torch.Tensor, torch.Tensor]:
    """``(t, T^-1 as a dense N x N fp64 matrix, Y = T X in fp64)`` for a 2-D ``x``."""
    x64 = as_2d(x).to(torch.float64)
    t = bhq_transform(x64)
    n = x64.shape[0]
    t_inv = t.inverse(torch.eye(n, dtype=torch.float64))
    return t, t_inv, t.apply(x64)


def _fp8_neighbours(v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two fp8 grid values ``lo <= v <= hi`` around each (finite) ``v``; ``lo == hi`` on the grid."""
    grid = fp8_grid(dtype)
    v = v.clamp(grid[0], grid[-1])
    hi_idx = torch.searchsorted(grid, v.contiguous()).clamp(max=grid.numel() - 1)
    hi = grid[hi_idx]
    lo = torch.where(hi == v, hi, grid[(hi_idx - 1).clamp(min=0)])
    return lo, hi


def _plain_entry_variance(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-entry SR variance for a transform-free spec, from the library's grid (fp64 result)."""
    _, scale, zp, offset = quantize_ref(x, spec)
    x64 = x.to(torch.float64)
    scale = scale.to(torch.float64).expand_as(x64)
    zp = zp.to(torch.float64).expand_as(x64)
    offset = offset.to(torch.float64).expand_as(x64)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.format.is_float:
        v = x64 / safe
        lo, hi = _fp8_neighbours(v, spec.code_dtype)
        var = (v - lo) * (hi - v) * scale**2
    else:
        v = (x64 - offset) / safe + zp  # pre-rounding value on the code grid
        f = v - torch.floor(v)
        var = f * (1 - f) * scale**2
    return torch.where(scale > 0, var, torch.zeros_like(var)).clamp_min(0)


def exact_entry_variance(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-entry variance of ``fqt_compiler.quantize(x, spec)`` (x's shape, fp64).

    Zero for round-to-nearest specs (the quantizer is deterministic).
    """
    if not spec.is_stochastic:
        return torch.zeros(x.shape, dtype=torch.float64)
    if spec.transform is Transform.BLOCK_HOUSEHOLDER:
        _, t_inv, y = bhq_parts(x)
        var_y = _plain_entry_variance(y, row_spec_of(spec))
        return (t_inv**2 @ var_y).reshape(x.shape)
    return _plain_entry_variance(as_2d(x), spec).reshape(x.shape)


def exact_variance(x: torch.Tensor, spec: QuantSpec) -> float:
    """Var[Q(X)] = trace of the covariance = sum over entries (docs/quantizers.md §1, §3, §6 claim 2)."""
    return exact_entry_variance(x, spec).sum().item()


def error_bound(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-entry bound on ``|quantize(x, spec) - x|``: one grid step (fp64, x's shape).

    For BHQ the step of each transformed row is mapped back: ``sum_j |(T^-1)_ij| step_j``.
    A small relative slack covers fp32 arithmetic and the cast back to ``x.dtype``.
    """
    x2 = as_2d(x)
    if spec.transform is Transform.BLOCK_HOUSEHOLDER:
        _, t_inv, y = bhq_parts(x2)
        _, scale, _, _ = quantize_ref(y, row_spec_of(spec))
        step = scale.to(torch.float64).expand_as(y)
        bound = t_inv.abs() @ step
        slack = 1e-5 * (t_inv.abs() @ y.abs())
    else:
        _, scale, _, _ = quantize_ref(x2, spec)
        scale = scale.to(torch.float64).expand(x2.shape)
        if spec.format.is_float:
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            v = x2.to(torch.float64) / safe
            lo, hi = _fp8_neighbours(v, spec.code_dtype)
            grid = fp8_grid(spec.code_dtype)
            top_gap = grid[-1] - grid[-2]
            width = torch.where(hi > lo, hi - lo, top_gap)
            bound = width * scale
        else:
            bound = scale
        slack = 1e-5 * x2.to(torch.float64).abs()
    out_eps = torch.finfo(x.dtype).eps if x.dtype != torch.float64 else 0.0
    slack = slack + out_eps * x2.to(torch.float64).abs() + torch.finfo(torch.float32).tiny
    return (bound + slack).reshape(x.shape)


def mc_draws(x: torch.Tensor, spec: QuantSpec, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` independent draws of ``fqt_compiler.quantize(x, spec)``, stacked on dim 0, in fp64."""
    return torch.stack([fqt_compiler.quantize(x, spec, generator=generator).to(torch.float64) for _ in range(n)])


def mc_variance_se(
    x: torch.Tensor, spec: QuantSpec, n: int, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Monte-Carlo total variance (sum over entries of the per-entry sample variance over ``n``
    draws) and an estimate of its standard error (from the spread of the per-draw terms)."""
    draws = mc_draws(x, spec, n, generator).reshape(n, -1)
    dev2 = ((draws - draws.mean(dim=0)) ** 2).sum(dim=1) * (n / (n - 1))  # mean of these = the estimate
    return dev2.mean().item(), dev2.std().item() / math.sqrt(n)


def mc_variance(x: torch.Tensor, spec: QuantSpec, n: int, generator: torch.Generator | None = None) -> float:
    """Monte-Carlo total variance of ``fqt_compiler.quantize(x, spec)`` over ``n`` draws."""
    return mc_draws(x, spec, n, generator).var(dim=0, unbiased=True).sum().item()


# --------------------------------------------------------------------------- the paper's code, restated
def paper_activation_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The reference code's activation quantizer (docs/quantizers.md §2.1), fp64, per tensor."""
    x = x.to(torch.float64)
    B = 2**bits - 1
    z = x.min() - 1e-8
    s = B / (x.max() + 1e-8 - z)
    q = torch.round(s * (x - z)).clamp(0, B)
    return q / s + z


def paper_weight_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The reference code's zero-on-grid weight quantizer (docs/quantizers.md §2.1), fp64, per tensor.

    Only defined when the tensor has a negative entry and qzero >= 1 (the code NaNs otherwise).
    """
    x = x.to(torch.float64)
    B = 2**bits - 1
    mn = torch.clamp(x.min(), max=0.0)
    mx = torch.clamp(x.max(), min=0.0)
    s = B / (mx - mn)
    qzero = torch.floor(-mn * s)
    assert qzero >= 1, "the paper's zero-on-grid rule divides by qzero"
    mx = (qzero - B) * mn / qzero
    s = B / (mx - mn)
    q = torch.round(s * (x - mn)).clamp(0, B)
    return q / s + mn
