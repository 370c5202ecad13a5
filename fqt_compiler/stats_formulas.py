"""Exact variances and the closed-form bounds of docs/quantizers.md §3 for one tensor.

Var[Q(X) | X] of stochastic rounding is a sum over elements of f(1 - f) step^2, with f the
fractional part of the pre-rounding value (3.1). For BHQ the element variances of the
transformed rows are weighted by ||T^-1 e_i||^2 (3.5), computed here in O(N) per group from the
Householder vectors: ||T^-1 e_i||^2 = (1 - 4 u_i^2) / s_i^2 + 4 u_i^2 sum_{r in g(i)} u_r^2 / s_r^2.

The bounds are sympy expressions, so they can be printed, simplified and evaluated:

    PTQ (per tensor)   N D R^2 / (4 B^2)
    PSQ (per row)      D sum_i R_i^2 / (4 B^2)
    per column         N sum_d R_d^2 / (4 B^2)
    BHQ                D sum_i ||T^-1 e_i||^2 R((TX)_i)^2 / (4 B^2)

with B = 2^b - 1. R is the range the grid actually covers (B times its step): equal to the
data's range for min-max grids, wider for the zero-on-grid grid, which keeps the bounds
rigorous for every built-in quantizer.
"""

from __future__ import annotations

import sympy as sp
import torch

from .bhq import bhq_transform
from .grid import grouped, scaled_values
from .layout import Layout, natural_2d, placement
from .specs import Granularity, QuantSpec, Scheme, Transform

__all__ = ["exact_variance", "variance_bound", "BOUNDS", "bound_expression"]

N, D, b = sp.symbols("N D b", positive=True, integer=True)
R, S_rows, S_cols, S_bhq = sp.symbols("R S_rows S_cols S_bhq", nonnegative=True)
B = 2**b - 1
i, d = sp.symbols("i d", integer=True)
Ri, Rd, W = sp.IndexedBase("R_row"), sp.IndexedBase("R_col"), sp.IndexedBase("w")

#: bound per scale layout, over aggregate symbols (S_rows = sum_i R_i^2, ...)
BOUNDS = {
    "tensor": N * D * R**2 / (4 * B**2),
    "row": D * S_rows / (4 * B**2),
    "column": N * S_cols / (4 * B**2),
    "bhq": D * S_bhq / (4 * B**2),
}
#: the same, written with explicit sums (for printing)
_PRETTY = {
    "tensor": BOUNDS["tensor"],
    "row": D * sp.Sum(Ri[i] ** 2, (i, 1, N)) / (4 * B**2),
    "column": N * sp.Sum(Rd[d] ** 2, (d, 1, D)) / (4 * B**2),
    "bhq": D * sp.Sum(W[i] * Ri[i] ** 2, (i, 1, N)) / (4 * B**2),
}


def _kind(spec: QuantSpec) -> str:
    if spec.transform is Transform.BLOCK_HOUSEHOLDER:
        return "bhq"
    if spec.granularity in (Granularity.TENSOR, Granularity.ROW, Granularity.COLUMN):
        return spec.granularity.value
    raise ValueError(f"no closed-form bound for {spec.short()}")


def bound_expression(spec: QuantSpec) -> sp.Expr:
    """The bound for ``spec`` as a sympy expression with explicit sums."""
    return _PRETTY[_kind(spec)]


def _bhq_weights(t) -> torch.Tensor:
    """||T^-1 e_i||^2 for every row, in O(N)."""
    u, s = t.u.to(torch.float64), t.scale.to(torch.float64)
    per_group = torch.zeros(t.num_groups, dtype=torch.float64, device=u.device).index_add_(0, t.group, u**2 / s**2)
    return (1 - 4 * u**2) / s**2 + 4 * u**2 * per_group[t.group]


def _prepared(x: torch.Tensor, spec: QuantSpec, layout: Layout):
    """(pre-rounding values, their steps, per-row weights, grouped matrix) of ``x`` under ``spec``."""
    if spec.quantizer is not None:
        raise ValueError(f"exact variances are known for the built-in quantizers only, not custom:{spec.quantizer}")
    m = natural_2d(x, layout).to(torch.float64)
    weights = None
    if spec.transform is Transform.BLOCK_HOUSEHOLDER:
        t = bhq_transform(m)
        m = t.apply(m)
        weights = _bhq_weights(t)
        spec = spec.with_(transform=Transform.NONE, granularity=Granularity.ROW)
    g = grouped(m, spec)
    v, scale, _, _ = scaled_values(g, spec)
    return v, scale.expand_as(v), weights, g


def exact_variance(x: torch.Tensor, spec: QuantSpec, layout: Layout = Layout.DIM0) -> float:
    """Var[Q(x) | x], summed over elements (0 for nearest rounding)."""
    if not spec.is_stochastic:
        return 0.0
    spec, layout = placement(spec, layout, x.dim())
    v, step, weights, _ = _prepared(x, spec, layout)
    if spec.format.is_float:
        # the two fp8 neighbours of v: one quantum apart, the quantum set by v's exponent
        mant, emin = (3, -6) if spec.format.value == "fp8_e4m3" else (2, -14)
        exp = torch.frexp(v.abs())[1] - 1
        quantum = torch.ldexp(torch.ones_like(v), torch.clamp(exp, min=emin) - mant)
        lo = torch.floor(v / quantum) * quantum
        hi = torch.clamp(lo + quantum, max=spec.qmax)
        per = (v - lo) * (hi - v) * step**2
    else:
        f = v - torch.floor(v)
        per = f * (1 - f) * step**2
    per = torch.nan_to_num(per)
    if weights is not None:  # rows of T X, mapped back through T^-1
        per = per * weights[:, None]
    return float(per.sum())


def variance_bound(x: torch.Tensor, spec: QuantSpec, layout: Layout = Layout.DIM0) -> float:
    """The closed-form bound of ``spec``'s kind, evaluated on ``x`` (see the module docstring)."""
    if not spec.is_stochastic:
        return 0.0
    spec, layout = placement(spec, layout, x.dim())
    v, step, weights, g = _prepared(x, spec, layout)
    kind = _kind(spec)
    bits = spec.bits if not spec.format.is_float else 8
    levels = 2**bits - 1
    covered = (levels * step.select(-1, 0)) if step.dim() else levels * step  # grid range per group
    m = natural_2d(x, layout)
    n_rows, n_cols = m.shape
    values = {N: n_rows, D: n_cols, b: bits}
    if kind == "tensor":
        values[R] = float(covered.max())
    elif kind == "row":
        values[S_rows] = float((covered**2).sum())
    elif kind == "column":
        values[S_cols] = float((covered**2).sum())
    else:
        values[S_bhq] = float((weights * covered.reshape(-1) ** 2).sum())
    if spec.scheme is Scheme.SYMMETRIC:
        # a symmetric grid of 2 qmax steps has B = 2 qmax bins, not 2^b - 1
        return float(BOUNDS[kind].subs(values).subs(b, bits) * (levels / (2 * spec.qmax)) ** 2)
    return float(BOUNDS[kind].subs(values))
