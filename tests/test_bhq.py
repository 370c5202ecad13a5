"""Block Householder quantizer (fqt_compiler.bhq): the structure claims of docs/quantizers.md §3.5 and §6 claim 5."""

from __future__ import annotations

import math

import pytest
import torch

import fqt_compiler as fqt
from fqt_compiler import QuantSpec
from fqt_compiler.bhq import bhq_transform, householder_qn
from tests.helpers.numerics import exact_variance

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=_gen(seed), dtype=F64)


def _one_dominant(n: int = 64, seed: int = 0) -> torch.Tensor:
    x = _randn(n, 32, seed)
    x[7] *= 1000.0
    return x


def _three_leaders(seed: int = 1) -> torch.Tensor:
    """37 small rows (range ~0.04) and three leaders of range exactly 400, 200 and 100 (rows 5, 17, 30)."""
    x = _randn(40, 16, seed) * 0.01
    ramp = torch.linspace(-0.5, 0.5, 16, dtype=F64)[torch.randperm(16, generator=_gen(seed))]
    x[[5, 17, 30]] = torch.tensor([400.0, 200.0, 100.0], dtype=F64)[:, None] * ramp
    return x


def _structured(n: int = 32, seed: int = 2) -> torch.Tensor:
    mags = torch.logspace(-3, 3, n, dtype=F64)[torch.randperm(n, generator=_gen(seed))]
    return _randn(n, 24, seed) * mags[:, None]


def _identical_ranges(n: int = 16, seed: int = 3) -> torch.Tensor:
    x = _randn(n, 20, seed)
    return (x - x.amin(1, keepdim=True)) / (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) * 2 - 1


def _with_zero_rows(seed: int = 4) -> torch.Tensor:
    x = _randn(10, 12, seed) * torch.logspace(0, 2, 10, dtype=F64)[:, None]
    x[[2, 5]] = 0.0
    return x


def _small(n: int, seed: int) -> torch.Tensor:
    return _randn(n, 8, seed) * torch.logspace(0, 1.5, n, dtype=F64)[torch.randperm(n, generator=_gen(seed))][:, None]


TENSORS = {
    "one-dominant-row": _one_dominant,
    "three-leaders": _three_leaders,
    "structured": _structured,
    "gaussian": lambda: _randn(32, 24, 5),
    "identical-ranges": _identical_ranges,
    "zero-rows": _with_zero_rows,
    "N2": lambda: _small(2, 6),
    "N3": lambda: _small(3, 7),
    "N5": lambda: _small(5, 8),
}
MULTI_ROW = [pytest.param(name, id=name) for name in TENSORS]


def ranges(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=1) - x.amin(dim=1)


def floored_ranges(x: torch.Tensor) -> torch.Tensor:
    """Row ranges plus bhq.py's documented relative floor (1e-8 of the largest range), which keeps
    the cube-root scales finite for all-zero rows; it shifts lambda by at most 1e-8 * max range."""
    r = ranges(x)
    return r + 1e-8 * r.max()


def groups_of(t) -> list[torch.Tensor]:
    """Row indices of each non-empty group."""
    return [torch.nonzero(t.group == g).flatten() for g in torch.unique(t.group)]


def leader_of(t, members: torch.Tensor) -> int:
    leaders = members[t.is_leader[members]]
    assert leaders.numel() == 1
    return int(leaders[0])


def householder_dense(n: int) -> torch.Tensor:
    """H_n = I - 2 u u^T with u = (ones / sqrt(n) - e1) / ||.|| (docs/quantizers.md §3.5)."""
    u = torch.full((n,), 1 / math.sqrt(n), dtype=F64)
    u[0] -= 1
    u = u / u.norm()
    return torch.eye(n, dtype=F64) - 2 * torch.outer(u, u)


def q_n(n: int) -> float:
    return householder_dense(n).abs().max().item()


# =========================================================================== the transform
@pytest.mark.parametrize("name", MULTI_ROW)
def test_inverse_times_transform_is_identity(name):
    x = TENSORS[name]()
    t = bhq_transform(x)
    n = x.shape[0]
    T = t.dense()
    T_inv = t.inverse(torch.eye(n, dtype=F64))
    eye = torch.eye(n, dtype=F64)
    torch.testing.assert_close(T_inv @ T, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(T @ T_inv, eye, rtol=0, atol=1e-10)
    # apply / inverse are the dense matrices
    torch.testing.assert_close(t.apply(x), T @ x, rtol=1e-12, atol=1e-12 * x.abs().max().item())
    torch.testing.assert_close(t.inverse(t.apply(x)), x, rtol=1e-10, atol=1e-10 * x.abs().max().item())


@pytest.mark.parametrize("name", MULTI_ROW)
def test_groups_partition_rows_with_one_leader_and_small_rows(name):
    x = TENSORS[name]()
    n = x.shape[0]
    t = bhq_transform(x)
    sizes = t.group_sizes()
    assert sizes.sum().item() == n
    assert t.group.shape == (n,) and t.group.min() >= 0 and t.group.max() < t.num_groups
    for members in groups_of(t):
        assert int(t.is_leader[members].sum()) == 1, "every group has exactly one leader"
        assert members.numel() >= 2, "every group has at least one small row (N >= 2)"
        assert sizes[t.group[members[0]]].item() == members.numel()


@pytest.mark.parametrize("name", MULTI_ROW)
def test_leaders_are_the_largest_rows_and_the_split_follows_the_rule(name):
    x = TENSORS[name]()
    n = x.shape[0]
    t = bhq_transform(x)
    r = ranges(x)
    assert r[t.is_leader].min() >= r[~t.is_leader].max()
    # docs/quantizers.md §3.5, grouping rule: the smallest k >= 1 with k * v[N-k-1] > sum(v[:N-k]) (ranges sorted descending)
    v = torch.sort(r + 1e-8 * r.max(), descending=True).values
    k = next((k for k in range(1, n) if k * v[n - k - 1] > v[: n - k].sum()), None)
    expected_leaders = 1 if k is None else n - k  # N = 2: strict '>' never holds; one group of two
    if n == 2:
        assert k is None
    assert int(t.is_leader.sum()) == expected_leaders


@pytest.mark.parametrize("name", MULTI_ROW)
def test_leader_shares_are_proportional_to_range(name):
    x = TENSORS[name]()
    t = bhq_transform(x)
    r = ranges(x)
    k = int((~t.is_leader).sum())
    lead_sum = r[t.is_leader].sum()
    for members in groups_of(t):
        lead = leader_of(t, members)
        share = members.numel() - 1
        expected = k * r[lead] / lead_sum
        assert share >= 1
        assert abs(share - expected) <= 1.0 + 1e-9, f"leader {lead}: {share} small rows, proportional share {expected:.2f}"


def test_three_leader_shares():
    # Leaders of range 400 : 200 : 100 sharing 37 small rows: cumulative shares round(37 * [4, 6, 7] / 7) = 21, 32, 37.
    x = _three_leaders()
    t = bhq_transform(x)
    assert sorted(torch.nonzero(t.is_leader).flatten().tolist()) == [5, 17, 30]
    sizes = {lead: int(t.group_sizes()[t.group[lead]]) for lead in (5, 17, 30)}
    assert sizes == {5: 1 + 21, 17: 1 + 11, 30: 1 + 5}


@pytest.mark.parametrize("name", MULTI_ROW)
def test_small_rows_are_dealt_in_sorted_order(name):
    x = TENSORS[name]()
    t = bhq_transform(x)
    r = ranges(x)
    groups = sorted(groups_of(t), key=lambda m: -r[leader_of(t, m)].item())
    smalls = [m[~t.is_leader[m]] for m in groups]
    for big, small in zip(smalls, smalls[1:]):
        assert r[big].min() >= r[small].max(), "a larger leader must take the larger small rows"


def test_one_dominant_row_makes_one_group_of_all_rows():
    x = _one_dominant()
    t = bhq_transform(x)
    assert int(t.is_leader.sum()) == 1 and bool(t.is_leader[7])
    assert int(t.group_sizes().max()) == 64


# =========================================================================== the Householder blocks and scales
@pytest.mark.parametrize(
    ("n", "expected"),
    [(2, 0.7071), (3, 0.7887), (4, 0.5), (5, 0.6382), (10, 0.8538), (50, 0.9767), (128, 0.9914)],
    ids=lambda v: None,
)
def test_householder_qn_table(n, expected):
    got = householder_qn(torch.tensor(n)).item()
    assert got == pytest.approx(expected, abs=5e-5)
    assert got == pytest.approx(q_n(n), rel=1e-12)


def test_householder_qn_matches_dense_matrices():
    ns = torch.arange(2, 40)
    got = householder_qn(ns)
    want = torch.tensor([q_n(int(n)) for n in ns], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", MULTI_ROW)
def test_blocks_are_the_householder_reflections(name):
    x = TENSORS[name]()
    t = bhq_transform(x)
    T = t.dense()
    H = T / t.scale[None, :]  # T = P^-1 blockdiag(H) P diag(s): first scale, then reflect
    n = x.shape[0]
    torch.testing.assert_close(H, H.t(), rtol=0, atol=1e-12)
    torch.testing.assert_close(H @ H, torch.eye(n, dtype=F64), rtol=0, atol=1e-12)
    same_group = t.group[:, None] == t.group[None, :]
    assert torch.equal(H[~same_group], torch.zeros_like(H[~same_group])), "no mixing across groups"
    for members in groups_of(t):
        lead = leader_of(t, members)
        g = members.numel()
        block = H[members][:, members]
        small = members != lead
        rs = math.sqrt(g)
        # H e_leader = ones / sqrt(n): the leader is spread evenly over its group
        torch.testing.assert_close(block[:, ~small].flatten(), torch.full((g,), 1 / rs, dtype=F64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(block[~small, :].flatten(), torch.full((g,), 1 / rs, dtype=F64), rtol=1e-12, atol=1e-12)
        sb = block[small][:, small]
        off = 1 / (g - rs)
        torch.testing.assert_close(sb.diagonal(), torch.full((g - 1,), 1 - off, dtype=F64), rtol=1e-12, atol=1e-12)
        if g > 2:
            mask = ~torch.eye(g - 1, dtype=torch.bool)
            torch.testing.assert_close(sb[mask], torch.full((int(mask.sum()),), -off, dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MULTI_ROW)
def test_scales_follow_the_cube_root_rule(name):
    x = TENSORS[name]()
    t = bhq_transform(x)
    r = floored_ranges(x)
    for members in groups_of(t):
        lead = leader_of(t, members)
        small = members[members != lead]
        n = members.numel()
        s1 = t.scale[lead].item()
        s2 = t.scale[small]
        assert torch.allclose(s2, s2[0].expand_as(s2), rtol=1e-12), "small rows of a group share one scale"
        s2 = s2[0].item()
        # the harmless global rescale: 1/s1^2 + 1/s2^2 = 1
        assert 1 / s1**2 + 1 / s2**2 == pytest.approx(1.0, rel=1e-9)
        w1 = r[lead].item() / math.sqrt(n)
        w2 = r[small].max().item() * q_n(n)  # lambda2 = the largest small row of the group
        assert s2 / s1 == pytest.approx(((n - 1) * w1 / w2) ** (1 / 3), rel=1e-6), f"group of {n} led by row {lead}"


def _variance_model(ratio: torch.Tensor, w1: float, w2: float, n: int) -> torch.Tensor:
    """(s1 w1 + s2 w2)^2 (1/s1^2 + (n-1)/s2^2) at s1 = 1, s2 = ratio (D / 4B^2 dropped)."""
    return (w1 + ratio * w2) ** 2 * (1 + (n - 1) / ratio**2)


@pytest.mark.parametrize(
    "name", [pytest.param(n, id=n) for n in ["N2", "N3", "N5", "one-dominant-row", "three-leaders", "structured"]]
)
def test_cube_root_scales_minimise_the_group_variance_model(name):
    x = TENSORS[name]()
    t = bhq_transform(x)
    r = floored_ranges(x)
    grid = torch.logspace(-4, 4, 400_001, dtype=F64)
    for members in groups_of(t):
        lead = leader_of(t, members)
        small = members[members != lead]
        n = members.numel()
        w1 = r[lead].item() / math.sqrt(n)
        w2 = r[small].max().item() * q_n(n)
        model = _variance_model(grid, w1, w2, n)
        best = grid[model.argmin()].item()
        ours = (t.scale[small[0]] / t.scale[lead]).item()
        assert ours == pytest.approx(best, rel=1e-3), f"group of {n}: s2/s1 = {ours:.6g}, grid optimum {best:.6g}"
        # and the optimum is the Hoelder closed form (w1^(2/3) + (n-1)^(1/3) w2^(2/3))^3
        closed = (w1 ** (2 / 3) + (n - 1) ** (1 / 3) * w2 ** (2 / 3)) ** 3
        assert model.min().item() == pytest.approx(closed, rel=1e-6)
        assert _variance_model(torch.tensor(ours, dtype=F64), w1, w2, n).item() == pytest.approx(closed, rel=1e-9)


# =========================================================================== small N, ties, zeros, invariances
def test_single_row_is_the_identity():
    x = _randn(1, 9, 10)
    t = bhq_transform(x)
    torch.testing.assert_close(t.dense(), torch.ones(1, 1, dtype=F64))
    torch.testing.assert_close(t.apply(x), x, rtol=0, atol=0)
    spec = QuantSpec(format="uint", bits=4, scheme="asym", granularity="row", rounding="stochastic")
    a = fqt.quantize(x, spec.with_(transform="bhq"), generator=_gen(3))
    b = fqt.quantize(x, spec, generator=_gen(3))
    assert torch.equal(a, b), "with one row BHQ is plain per-row quantization"


@pytest.mark.parametrize("n", [2, 3], ids=lambda n: f"N{n}")
def test_two_and_three_rows_form_one_group(n):
    x = _small(n, 11)
    t = bhq_transform(x)
    assert int(t.is_leader.sum()) == 1
    assert t.group_sizes().max().item() == n
    assert bool(t.is_leader[ranges(x).argmax()])


@pytest.mark.parametrize("n", [2, 3, 8, 9])
def test_tied_ranges_are_deterministic(n):
    row = _randn(1, 10, 12)
    x = row.expand(n, 10).contiguous()  # every row has the same range
    t1, t2 = bhq_transform(x), bhq_transform(x.clone())
    for a, b in zip((t1.group, t1.is_leader, t1.u, t1.scale), (t2.group, t2.is_leader, t2.u, t2.scale)):
        assert torch.equal(a, b)
    assert t1.group_sizes().sum() == n
    spec = QuantSpec(format="uint", bits=4, scheme="asym", granularity="row", rounding="stochastic", transform="bhq")
    torch.manual_seed(5)
    q1 = fqt.quantize(x, spec)
    torch.manual_seed(5)
    q2 = fqt.quantize(x, spec)
    assert torch.equal(q1, q2)
    assert q1.isfinite().all()


def test_permuting_rows_permutes_the_transform():
    x = _structured()
    perm = torch.randperm(x.shape[0], generator=_gen(13))
    T = bhq_transform(x).dense()
    T_perm = bhq_transform(x[perm]).dense()
    torch.testing.assert_close(T_perm, T[perm][:, perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factor", [1e-30, 1e-6, 1e6, 1e30], ids=lambda f: f"{f:g}")
def test_transform_is_scale_invariant(factor):
    x = _structured()
    T = bhq_transform(x).dense()
    torch.testing.assert_close(bhq_transform(x * factor).dense(), T, rtol=1e-9, atol=1e-12)


def test_zero_rows():
    x = _with_zero_rows()
    t = bhq_transform(x)
    assert t.scale.isfinite().all() and (t.scale > 0).all()
    assert not t.is_leader[[2, 5]].any(), "all-zero rows are never leaders here"
    spec = QuantSpec(format="uint", bits=4, scheme="asym", granularity="row", rounding="stochastic", transform="bhq")
    out = fqt.quantize(x, spec)
    assert out.isfinite().all()


@pytest.mark.parametrize("n", [1, 2, 3, 6], ids=lambda n: f"N{n}")
def test_all_zero_matrix(n):
    x = torch.zeros(n, 5, dtype=F64)
    t = bhq_transform(x)
    assert t.scale.isfinite().all() and (t.scale > 0).all()
    T = t.dense()
    torch.testing.assert_close(t.inverse(T), torch.eye(n, dtype=F64), rtol=0, atol=1e-12)
    spec = QuantSpec(format="uint", bits=4, scheme="asym", granularity="row", rounding="stochastic", transform="bhq")
    assert torch.equal(fqt.quantize(x, spec), x)


# =========================================================================== the variance model
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"b{b}")
def test_one_dominant_row_variance_matches_the_model(bits):
    # docs/quantizers.md §3.5: Var_BHQ ~ D (sum of leader ranges)^2 / (4 B^2 N); measured ratio 0.69-0.85.
    x = _one_dominant()
    n, d = x.shape
    B = 2**bits - 1
    model = d * ranges(x).max().item() ** 2 / (4 * B**2 * n)
    spec = QuantSpec(format="uint", bits=bits, scheme="asym", granularity="row", rounding="stochastic", transform="bhq")
    ratio = exact_variance(x, spec) / model
    assert 0.5 < ratio < 1.0, ratio


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (5, 3, 2, 4, 2)])
def test_channels_last_batch_quantizes_in_memory_order_like_the_natural_matrix(shape, rounding):
    """A channels-last batch runs BHQ on its rows in memory order (a view: the natural matrix
    of such a tensor is a gather per element); codes, statistics, the transform and the inverse
    are the natural path's bit for bit, stochastic draws included."""
    import fqt_compiler.bhq as bhq
    from fqt_compiler.layout import Layout

    spec = QuantSpec(transform="bhq", scheme="asym", granularity="row", rounding=rounding, bits=5)
    spread = torch.logspace(0, 3, shape[0]).reshape(-1, *[1] * (len(shape) - 1))  # rows of unequal ranges: groups
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * spread
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = x.contiguous(memory_format=fmt)
    assert bhq._memory_rows(x, Layout.DIM0) is not None
    seed = torch.tensor([77])
    fast = bhq.bhq_quantize_ref(x, spec, seed=seed)
    y = fast[0].float()
    fast_inv = bhq.bhq_inverse_ref(y, *fast[4:])
    original = bhq._memory_rows
    bhq._memory_rows = lambda *args: None
    try:
        slow = bhq.bhq_quantize_ref(x, spec, seed=seed)
        slow_inv = bhq.bhq_inverse_ref(y, *slow[4:])
    finally:
        bhq._memory_rows = original
    for got, want in zip(fast, slow):
        assert got.shape == want.shape and torch.equal(got, want)
    assert fast[0].is_contiguous(memory_format=fmt)
    assert torch.equal(fast_inv, slow_inv)
