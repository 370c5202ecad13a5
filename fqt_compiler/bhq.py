"""Block Householder quantizer (BHQ), docs/quantizers.md §3.5, in O(N*D) on the tensor's device.

For an N x D gradient X (rows = samples):

1. row ranges m_i (plus a relative epsilon so that zero rows do not break the scale rule),
   sorted descending (stable, so ties are deterministic);
2. the smallest k >= 1 with k * v[N-k-1] > sum(v[:N-k]) splits rows into M = N - k leaders
   and k small rows (for N = 2 no k satisfies the strict test; one group of 2 is used, and for
   N = 1 the transform is the identity);
3. small rows are dealt to leaders in sorted order, leader i taking
   round(k * cumsum(v)[i] / sum(v[:M])) - (the same for i - 1) >= 1 of them;
4. per group of size n: w1 = lambda1 / sqrt(n), w2 = lambda2 * q_n, s1 = w1^(-1/3),
   s2 = (w2 / (n - 1))^(-1/3), both times sqrt(1/s1^2 + 1/s2^2) (the cube-root rule);
5. Y = T X: scale each row by its s, then reflect within its group with
   H = I - 2 u u^T, u = (1/sqrt(n) * ones - e_leader) / ||.||, applied as x - 2 u (u^T x);
6. per-row quantization of Y, then X_hat = T^-1 Y_hat = diag(1/s) H Y_hat (H is symmetric).

No dense N x N matrix is built and nothing leaves the device: the grouping is tensor ops
(cumsum, searchsorted, index_add) with k kept as a 0-d tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import dequantize_ref, draw_seed, hash_uniform, quantize_grouped

from .layout import Layout, from_natural_2d, natural_2d, shape_scale
from .specs import Granularity, QuantSpec, Transform

__all__ = [
    "BHQTransform", "bhq_transform", "group_counts", "bhq_quantize_ref", "bhq_inverse_ref", "bhq_fake_quantize_2d",
    "householder_qn",
]

# Relative floor on row ranges: keeps the cube-root scales finite for all-zero rows while
# staying scale-invariant (an absolute 1e-8, as in the reference code, would swamp 1e-30 grads).
_REL_EPS = 1e-8


def householder_qn(n: torch.Tensor) -> torch.Tensor:
    """max |H_ij| of the n x n Householder matrix mapping e1 to ones/sqrt(n) (n >= 2)."""
    n = n.to(torch.float64)
    rs = torch.sqrt(n)
    off = 1.0 / (n - rs)
    first_and_diag = torch.maximum(1.0 / rs, (1.0 - off).abs())
    # the off-diagonal entries -1/(n - sqrt(n)) of the small-row block exist only for n > 2
    return torch.where(n > 2, torch.maximum(first_and_diag, off), first_and_diag)


@dataclass(frozen=True)
class BHQTransform:
    """T = P^-1 blockdiag(H) P diag(s) for one N x D matrix, stored in O(N) form.

    ``group`` maps each row to its group id, ``u`` holds each row's entry of its group's
    Householder vector, ``scale`` the per-row s. Apply with :meth:`apply`, invert with
    :meth:`inverse`; :meth:`dense` builds the N x N matrix (tests and reports only).
    """

    group: torch.Tensor  # (N,) int64 group id per row
    is_leader: torch.Tensor  # (N,) bool
    u: torch.Tensor  # (N,) Householder vector entries
    scale: torch.Tensor  # (N,) the cube-root-rule row scales s
    num_groups: int

    def _reflect(self, z: torch.Tensor) -> torch.Tensor:
        proj = torch.zeros(self.num_groups, z.shape[1], dtype=z.dtype, device=z.device)
        proj.index_add_(0, self.group, self.u.to(z.dtype)[:, None] * z)
        return z - 2.0 * self.u.to(z.dtype)[:, None] * proj[self.group]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """T @ x: scale rows, then reflect within groups."""
        return self._reflect(self.scale.to(x.dtype)[:, None] * x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """T^-1 @ y = diag(1/s) H y (each H is symmetric and orthogonal)."""
        return self._reflect(y) / self.scale.to(y.dtype)[:, None]

    def dense(self) -> torch.Tensor:
        n = self.group.numel()
        return self.apply(torch.eye(n, dtype=torch.float64, device=self.group.device))

    def group_sizes(self) -> torch.Tensor:
        return group_counts(self.group, self.num_groups)


def group_counts(index: torch.Tensor, n: int) -> torch.Tensor:
    """How many entries of ``index`` fall in each of ``n`` groups (a BHQ transform's group sizes)."""
    # bincount with a static output size (bincount's size depends on the data: untraceable)
    return torch.zeros(n, dtype=torch.int64, device=index.device).scatter_add_(0, index, torch.ones_like(index))


def bhq_transform(x: torch.Tensor) -> BHQTransform:
    """The BHQ transform of a 2-D matrix ``x`` (rows = samples), following docs/quantizers.md §3.5."""
    if x.dim() != 2:
        raise ValueError(f"bhq_transform expects a 2-D matrix, got shape {tuple(x.shape)}")
    n_rows = x.shape[0]
    dev = x.device
    dt = torch.float64  # O(N) bookkeeping: fp64 makes the share rounding robust
    if n_rows == 0:  # no rows (a batch of 0): nothing to transform
        none = torch.zeros(0, dtype=dt, device=dev)
        return BHQTransform(
            torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, dtype=torch.bool, device=dev), none, none, 0
        )
    if n_rows == 1:
        one = torch.ones(1, dtype=dt, device=dev)
        return BHQTransform(
            torch.zeros(1, dtype=torch.long, device=dev), torch.ones(1, dtype=torch.bool, device=dev), 0 * one, one, 1
        )
    v, order = torch.sort(_row_ranges(x, dt), descending=True, stable=True)
    group_sorted, is_lead_sorted, n_lead, c = _groups(v)
    s1, s2, n_g = _cube_root_scales(v, group_sorted, n_lead, c)

    # Per-row values in sorted order, then scattered back to the original row positions.
    g = group_sorted
    rs = torch.sqrt(n_g[g])
    unorm = torch.sqrt(2.0 - 2.0 / rs)
    u_sorted = torch.where(is_lead_sorted, (1.0 / rs - 1.0) / unorm, (1.0 / rs) / unorm)
    s_sorted = torch.where(is_lead_sorted, s1, s2[g])

    def unsort(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(t)
        out[order] = t
        return out

    return BHQTransform(unsort(g), unsort(is_lead_sorted), unsort(u_sorted), unsort(s_sorted), n_rows)


def _row_ranges(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """Step 1: every row's range, made positive (a tiny share of the largest, or 1 when all are
    0) so the grouping arithmetic never divides by zero."""
    if x.shape[1] == 0:  # rows of no elements: every range is 0
        rng = torch.zeros(x.shape[0], dtype=dt, device=x.device)
    else:
        rng = (x.amax(dim=1) - x.amin(dim=1)).to(dt)
    rng = torch.nan_to_num(rng, nan=0.0, posinf=0.0)  # NaN rows are propagated by the quantizer
    top = rng.max()
    return rng + _REL_EPS * top + torch.where(top > 0, 0.0, 1.0)


def _groups(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2-3 on the ranges ``v`` sorted descending: each sorted row's group (its leader's
    sorted position), whether it leads, the number of leaders M and the leaders' cumulative
    shares of small rows."""
    n_rows, dev, dt = v.shape[0], v.device, v.dtype
    # Step 2: idx = N - k - 1 for k = 1..N-1; the smallest k passing is the largest idx passing.
    idx = torch.arange(n_rows - 1, device=dev)
    k_of_idx = (n_rows - 1 - idx).to(dt)
    csum = torch.cumsum(v, 0)
    passes = k_of_idx * v[: n_rows - 1] > csum[: n_rows - 1]
    best_idx = torch.where(passes, idx, torch.full_like(idx, -1)).max()
    # No k passes only for N == 2 (strict ">" fails at equality): use one group of two.
    best_idx = torch.where(best_idx >= 0, best_idx, torch.zeros_like(best_idx))
    n_lead = best_idx + 1  # M, a 0-d tensor
    k = n_rows - n_lead

    # Step 3: cumulative shares c_i for leaders; the last one is exactly k.
    pos = torch.arange(n_rows, device=dev)
    is_lead_sorted = pos < n_lead
    lead_sum = torch.where(is_lead_sorted, v, 0).sum()
    c = torch.round(k.to(dt) * torch.cumsum(torch.where(is_lead_sorted, v, 0), 0) / lead_sum)
    c = torch.where(pos == n_lead - 1, k.to(dt), c)
    c = torch.where(is_lead_sorted, c, torch.full_like(c, float("inf")))
    small_rank = (pos - n_lead).to(dt)  # rank among small rows, valid where not leader
    owner = torch.searchsorted(c.contiguous(), small_rank.contiguous(), right=True)
    return torch.where(is_lead_sorted, pos, owner), is_lead_sorted, n_lead, c


def _cube_root_scales(
    v: torch.Tensor, group_sorted: torch.Tensor, n_lead: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 4: per group (by its leader's sorted position) the leader's and the small rows'
    scales, from lambda1 (the leader's range) and lambda2 (the group's largest small row), and
    the group sizes (at least 2)."""
    n_rows, dt = v.shape[0], v.dtype
    size = group_counts(group_sorted, n_rows).to(dt)
    c_prev = torch.cat([torch.zeros(1, dtype=dt, device=v.device), c[:-1]])
    first_small = (n_lead + c_prev).clamp(max=n_rows - 1).long()
    lam1 = v
    lam2 = v[first_small]
    n_g = size.clamp(min=2)
    w1 = lam1 / torch.sqrt(n_g)
    w2 = lam2 * householder_qn(n_g)
    s1 = w1.pow(-1.0 / 3.0)
    s2 = (w2 / (n_g - 1)).pow(-1.0 / 3.0)
    norm = torch.sqrt(1.0 / s1**2 + 1.0 / s2**2)
    return s1 * norm, s2 * norm, n_g


def bhq_quantize_ref(
    x: torch.Tensor,
    spec: QuantSpec,
    layout: Layout = Layout.DIM0,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """BHQ quantization of ``x`` (rows of its natural matrix are the samples).

    Returns the per-row codes of Y = T X with their scale / zero point / offset (shaped like
    :func:`reference.quantize_ref`'s per-row statistics) and the transform's per-row group id,
    Householder entry u and scale s (each of N values), so that

        x_hat = bhq_inverse_ref(dequantize_ref(codes, scale, zero_point, offset), group, u, s)

    The transform is applied in fp32: its rounding is far below one quantization step.
    """
    order = _memory_rows(x, layout) if noise is None else None
    if order is not None:  # a channels-last batch: its rows in memory order, the same numbers (below)
        m = x.permute(order).reshape(x.shape[0], -1)
        if spec.is_stochastic:
            seed = seed if seed is not None else draw_seed(x.device, generator)
            noise = hash_uniform(seed, x.shape, x.device).permute(order).reshape(m.shape)
    else:
        m = natural_2d(x, layout)
    m = m.to(torch.float64 if m.dtype == torch.float64 else torch.float32)
    t = bhq_transform(m)
    y = t.apply(m)
    row_spec = spec.with_(transform=Transform.NONE, granularity=Granularity.ROW)
    codes, scale, zp, offset = quantize_grouped(y, row_spec, noise, generator, seed)
    codes = _unpermuted(codes, x, order) if order is not None else from_natural_2d(codes, x.shape, layout)
    stats = [shape_scale(t_, x.shape, Granularity.ROW, layout) for t_ in (scale, zp, offset)]
    return (codes, *stats, t.group, t.u.to(m.dtype), t.scale.to(m.dtype))


def bhq_inverse_ref(
    y: torch.Tensor, group: torch.Tensor, u: torch.Tensor, s: torch.Tensor, layout: Layout = Layout.DIM0
) -> torch.Tensor:
    """T^-1 applied to the rows of ``y``'s natural matrix (``y``'s shape and dtype are kept)."""
    order = _memory_rows(y, layout)
    m = y.permute(order).reshape(y.shape[0], -1) if order is not None else natural_2d(y, layout)
    t = BHQTransform(group, group == group, u.to(m.dtype), s.to(m.dtype), group.numel())
    out = t.inverse(m)
    return _unpermuted(out, y, order) if order is not None else from_natural_2d(out, y.shape, layout)


def _memory_rows(x: torch.Tensor, layout: Layout) -> list[int] | None:
    """``x``'s dims in memory order (outermost first) where its samples' rows are a view of it
    in that order but not in the natural matrix's (a channels-last batch); else None.

    BHQ treats a row's elements alike (row ranges, and each column's reflection, do not depend
    on the column order) and its stochastic draws follow the natural order's indices (passed as
    noise), so the memory-order matrix gives the same codes. Reading a channels-last gradient
    through its natural matrix, Inductor gathered every element (BHQ's quantizer and inverse
    ran at a thirtieth of memory speed)."""
    if layout is not Layout.DIM0 or x.dim() < 3 or x.is_contiguous():
        return None
    order = [0, *sorted(range(1, x.dim()), key=lambda d: -x.stride(d))]
    return order if x.permute(order).is_contiguous() else None


def _unpermuted(m: torch.Tensor, like: torch.Tensor, order: list[int]) -> torch.Tensor:
    """The rows ``m`` of :func:`_memory_rows`'s matrix back in ``like``'s shape (and memory order)."""
    inverse = [order.index(d) for d in range(len(order))]
    return m.reshape([like.shape[d] for d in order]).permute(inverse)


def bhq_fake_quantize_2d(
    m: torch.Tensor,
    spec: QuantSpec,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """BHQ quantize-dequantize of a natural 2-D matrix: T^-1 Q_row(T m)."""
    codes, scale, zp, offset, group, u, s = bhq_quantize_ref(m, spec, Layout.DIM0, noise=noise, generator=generator, seed=seed)
    y_hat = dequantize_ref(codes, scale, zp, offset, scale.dtype)
    return bhq_inverse_ref(y_hat, group, u, s, Layout.DIM0).to(m.dtype)
