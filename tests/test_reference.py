"""The reference quantizers (fqt_compiler.reference): value tables, SR statistics, bounds, edge cases.

Claims come from docs/quantizers.md (sections 2.1, 3 and 6) and the reference module's docstring.
Every statistical test runs at a fixed seed with tolerances of about five standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch

import fqt_compiler as fqt
from fqt_compiler import QuantSpec
from fqt_compiler.ops import quantize_op
from fqt_compiler.grid import dequantize_ref, scaled_values
from fqt_compiler.layout import Layout, scale_shape
from fqt_compiler.reference import fake_quantize_ref, quantize_ref
from fqt_compiler.specs import Granularity, Scheme, Transform
from tests.helpers.numerics import (
    bhq_parts,
    error_bound,
    exact_entry_variance,
    exact_variance,
    mc_draws,
    mc_variance,
    mc_variance_se,
    paper_activation_fake_quant,
    paper_weight_fake_quant,
    spec_id,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(n: int, d: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(n, d, generator=_gen(seed), dtype=F64).to(dtype)


def structured(n: int, d: int, seed: int = 0, decades: float = 3.0) -> torch.Tensor:
    """Rows whose magnitudes differ by orders of magnitude (10^-decades .. 10^decades), shuffled."""
    x = torch.randn(n, d, generator=_gen(seed), dtype=F64)
    mags = torch.logspace(-decades, decades, n, dtype=F64)[torch.randperm(n, generator=_gen(seed + 1))]
    return x * mags[:, None]


def sr(bits: int, **kw) -> QuantSpec:
    return QuantSpec(format="uint", bits=bits, rounding="stochastic", **kw)


def ptq(bits: int) -> QuantSpec:
    return sr(bits, scheme="zog")


def psq(bits: int) -> QuantSpec:
    return sr(bits, scheme="asym", granularity="row")


def per_column(bits: int) -> QuantSpec:
    return sr(bits, scheme="asym", granularity="column")


def bhq(bits: int) -> QuantSpec:
    return sr(bits, scheme="asym", granularity="row", transform="bhq")


# Stochastic quantizers whose statistics are checked (the paper's four + the int8 / fp8 gradient formats).
SR_SPECS = [
    pytest.param(ptq(4), id="ptq4"),
    pytest.param(psq(4), id="psq4"),
    pytest.param(per_column(4), id="per-column4"),
    pytest.param(bhq(4), id="bhq4"),
    pytest.param(bhq(8), id="bhq8"),
    pytest.param(QuantSpec(bits=8, granularity="row", rounding="stochastic"), id="int8-sym-row-SR"),
    pytest.param(QuantSpec(bits=3, granularity="column", rounding="stochastic"), id="int3-sym-column-SR"),
    pytest.param(QuantSpec(format="fp8_e4m3", rounding="stochastic"), id="e4m3-tensor-SR"),
    pytest.param(QuantSpec(format="fp8_e5m2", granularity="row", rounding="stochastic"), id="e5m2-row-SR"),
]


def _builtin_specs() -> list[QuantSpec]:
    """Every spec any built-in recipe uses (forward and gradient), deduplicated, in a stable order."""
    seen: dict[str, QuantSpec] = {}
    for name in fqt.recipes():
        r = fqt.recipe(name)
        for spec in (
            r.output.activation,
            r.output.weight,
            r.grad_input.grad_output,
            r.grad_input.weight,
            r.grad_weight.grad_output,
            r.grad_weight.activation,
        ):
            if spec is not None:
                seen.setdefault(spec.key(), spec)
    return list(seen.values())


BUILTIN_SPECS = [pytest.param(s, id=spec_id(s)) for s in _builtin_specs()]


def _is_asym(spec: QuantSpec) -> bool:
    return spec.scheme is Scheme.ASYMMETRIC


def _is_bhq(spec: QuantSpec) -> bool:
    return spec.transform is Transform.BLOCK_HOUSEHOLDER


def assert_within_bound(out: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> None:
    err = (out.to(F64) - x.to(F64)).abs()
    bound = error_bound(x, spec)
    bad = err > bound
    assert not bad.any(), (
        f"{spec.short()}: {int(bad.sum())} entries off by more than one step; "
        f"worst err {err[bad].max().item():.3g} vs bound {bound[bad].min().item():.3g}"
    )


# =========================================================================== hand-worked value tables
def test_value_table_int8_symmetric_per_tensor():
    # amax = 127 -> scale 1: codes are round-half-to-even of x itself.
    x = torch.tensor([[127.0, -63.5, 2.5, 0.0], [3.5, -1.5, 0.49, -127.0]])
    codes, scale, zp, offset = quantize_ref(x, QuantSpec(bits=8))
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[127, -64, 2, 0], [4, -2, 0, -127]]
    assert scale.item() == 1.0 and zp.item() == 0.0 and offset.item() == 0.0
    assert fqt.quantize(x, QuantSpec(bits=8)).tolist() == [[127.0, -64.0, 2.0, 0.0], [4.0, -2.0, 0.0, -127.0]]


def test_value_table_int4_symmetric_per_row():
    x = torch.tensor([[7.0, 3.5, -0.5, 1.2], [14.0, -7.0, 3.0, 0.0]])
    spec = QuantSpec(bits=4, granularity="row")
    codes, scale, _, _ = quantize_ref(x, spec)
    assert scale.flatten().tolist() == [1.0, 2.0]
    assert codes.tolist() == [[7, 4, 0, 1], [7, -4, 2, 0]]
    assert fqt.quantize(x, spec).tolist() == [[7.0, 4.0, 0.0, 1.0], [14.0, -8.0, 4.0, 0.0]]


@pytest.mark.parametrize(
    ("fmt", "codes_expected", "zp_expected"),
    [
        pytest.param("uint", [0, 0, 1, 8, 8, 15, 11, 11], 0.0, id="uint4"),
        pytest.param("int", [-8, -8, -7, 0, 0, 7, 3, 3], -8.0, id="int4-shifted"),
    ],
)
def test_value_table_asymmetric_4bit(fmt, codes_expected, zp_expected):
    # min -15, max 15, B = 15 -> step 2, levels (x + 15) / 2 rounded half to even.
    x = torch.tensor([[-15.0, -14.0, -12.9, 0.0, 1.0, 15.0, 7.5, 6.5]], dtype=F64)
    spec = QuantSpec(format=fmt, bits=4, scheme="asym")
    codes, scale, zp, offset = quantize_ref(x, spec)
    assert codes.flatten().tolist() == codes_expected
    assert scale.item() == 2.0 and offset.item() == -15.0 and zp.item() == zp_expected
    expected = [-15.0, -15.0, -13.0, 1.0, 1.0, 15.0, 7.0, 7.0]
    assert fqt.quantize(x, spec).flatten().tolist() == expected
    assert dequantize_ref(codes, scale, zp, offset, F64).flatten().tolist() == expected


def test_value_table_zero_on_grid_exact_range():
    # min -3, max 12, B = 15: qzero = 3, step 1.
    x = torch.tensor([[-3.0, 12.0, 0.0, 0.5, 1.5, -2.5, 7.2]], dtype=F64)
    spec = QuantSpec(format="uint", bits=4, scheme="zog")
    codes, scale, zp, offset = quantize_ref(x, spec)
    assert codes.flatten().tolist() == [0, 15, 3, 4, 4, 0, 10]
    assert scale.item() == 1.0 and zp.item() == 3.0 and offset.item() == 0.0
    assert fqt.quantize(x, spec).flatten().tolist() == [-3.0, 12.0, 0.0, 1.0, 1.0, -3.0, 7.0]


def test_value_table_zero_on_grid_stretched_range():
    # min -1, max 3.1, B = 15: qzero = floor(1 * 15 / 4.1) = 3; the paper's stretch gives step -min/qzero = 1/3,
    # so the grid runs from -1 to 4 and 0 is level 3.
    x = torch.tensor([[-1.0, 3.1, 0.0, 0.2, -0.5]], dtype=F64)
    spec = QuantSpec(format="uint", bits=4, scheme="zog")
    codes, scale, zp, _ = quantize_ref(x, spec)
    assert zp.item() == 3.0
    assert scale.item() == pytest.approx(1 / 3, rel=1e-15)
    assert codes.flatten().tolist() == [0, 12, 3, 4, 2]  # -0.5 -> 1.5 -> 2 (half to even)
    out = fqt.quantize(x, spec).flatten()
    assert out[2].item() == 0.0
    assert out.tolist() == pytest.approx([-1.0, 3.0, 0.0, 1 / 3, -1 / 3], rel=1e-14)


@pytest.mark.parametrize("scheme", ["asym", "zog"])
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("gran", ["tensor", "row", "column"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_int_and_uint_codes_give_the_same_values(scheme, bits, gran, rounding):
    # INT asymmetric codes are the UINT levels shifted by -2**(b-1); the dequantized values must not change.
    x = structured(6, 9, seed=2, decades=1.0).to(torch.float32)
    kw = dict(bits=bits, scheme=scheme, granularity=gran, rounding=rounding)
    u_codes, _, _, _ = quantize_ref(x, QuantSpec(format="uint", **kw), generator=_gen(5))
    i_codes, _, _, _ = quantize_ref(x, QuantSpec(format="int", **kw), generator=_gen(5))
    assert torch.equal(i_codes.to(torch.int16), u_codes.to(torch.int16) - 2 ** (bits - 1))
    u = fqt.quantize(x, QuantSpec(format="uint", **kw), generator=_gen(5))
    i = fqt.quantize(x, QuantSpec(format="int", **kw), generator=_gen(5))
    assert torch.equal(i, u)


@pytest.mark.parametrize("fmt", ["uint", "int"])
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("gran", ["tensor", "row", "column"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_zero_on_grid_maps_zero_to_exactly_zero(fmt, bits, gran, rounding):
    spec = QuantSpec(format=fmt, bits=bits, scheme="zog", granularity=gran, rounding=rounding)
    x = gaussian(6, 9, seed=3, dtype=torch.float32) * torch.tensor([0.01, 1, 3, 100, 1e-3, 7.0])[:, None]
    x[x.abs() < 0.4 * x.abs().mean()] = 0.0  # plenty of exact zeros, in every row and column
    x[:, 0] = 0.0
    x[0, :] = 0.0
    zeros = x == 0
    out = fqt.quantize(x, spec)
    assert out[zeros].eq(0).all()
    codes, _, zp, _ = quantize_ref(x, spec)
    zp_full = zp.expand_as(x)
    assert torch.equal(codes.to(torch.float32)[zeros], zp_full[zeros].to(torch.float32))
    assert torch.equal(zp, torch.round(zp)), "the zero point must be an integer level"


@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_zero_on_grid_one_signed_tensor_is_finite(bits, sign):
    # The paper's code computes qzero = 0 for an all-positive tensor and divides by it (NaN).
    x = torch.rand(5, 7, generator=_gen(1), dtype=torch.float32) + 1.0
    if sign == "negative":
        x = -x
    for gran in ["tensor", "row", "column"]:
        spec = QuantSpec(format="uint", bits=bits, scheme="zog", granularity=gran)
        out = fqt.quantize(x, spec)
        assert out.isfinite().all(), gran
        assert_within_bound(out, x, spec)
        # the range is widened to contain 0, so the grid step is at most max|x| / (B - 1)
        _, scale, _, _ = quantize_ref(x, spec)
        assert (scale <= x.abs().amax() / (spec.levels - 1) * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_on_grid_matches_the_papers_weight_quantizer(bits, seed):
    x = gaussian(16, 16, seed=seed) + 0.3 * seed  # shifted: qzero away from B / 2
    ours = fqt.quantize(x, QuantSpec(format="uint", bits=bits, scheme="zog"))
    theirs = paper_weight_fake_quant(x, bits)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12 * x.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("seed", [0, 1])
def test_asymmetric_matches_the_papers_activation_quantizer(bits, seed):
    x = gaussian(16, 16, seed=seed) * 2 + 0.5
    ours = fqt.quantize(x, QuantSpec(format="uint", bits=bits, scheme="asym"))
    theirs = paper_activation_fake_quant(x, bits)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)


@pytest.mark.parametrize("gran", ["tensor", "row", "column"])
def test_symmetric_scales_follow_their_groups(gran):
    x = gaussian(5, 7, seed=4, dtype=torch.float32) * torch.arange(1, 8, dtype=torch.float32)
    _, scale, _, _ = quantize_ref(x, QuantSpec(bits=8, granularity=gran))
    amax = {"tensor": x.abs().amax(), "row": x.abs().amax(1, keepdim=True), "column": x.abs().amax(0, keepdim=True)}[gran]
    torch.testing.assert_close(scale, amax / 127, rtol=1e-7, atol=0)


# =========================================================================== stochastic rounding statistics
@pytest.mark.parametrize("spec", SR_SPECS)
def test_stochastic_rounding_is_unbiased(spec):
    x = structured(12, 16, seed=5, decades=1.0).to(torch.float32).to(F64)
    n = 1500
    torch.manual_seed(11)
    draws = mc_draws(x, spec, n)
    mean = draws.mean(dim=0)
    var = exact_entry_variance(x, spec)
    assert var.sum() > 0
    err = mean - x
    # Per entry: 5 standard errors, plus a few grid steps / n for entries whose rounding probability
    # is tiny (their count of up-roundings is Poisson, not Gaussian).
    tol = 5 * (var / n).sqrt() + 4 * error_bound(x, spec) / n + 1e-12 * x.abs()
    bad = err.abs() > tol
    assert not bad.any(), f"{int(bad.sum())} biased entries; worst |err|/tol = {(err.abs() / tol).max():.2f}"
    # Aggregate: the signed sum of errors is N(0, sum var / n) for an unbiased quantizer.
    z = err.sum() / (var.sum() / n).sqrt()
    assert abs(z) < 5, f"z = {z:.2f}"
    # ... and the mean squared error is sum var / n (checks the variance as well as the bias).
    ratio = (err**2).sum() / (var.sum() / n)
    dof = var.sum() ** 2 / (var**2).sum()
    assert abs(ratio - 1) < 5 * math.sqrt(2 / dof) + 0.05, f"ratio = {ratio:.3f}, effective dof {dof:.1f}"


@pytest.mark.parametrize("spec", SR_SPECS)
@pytest.mark.parametrize("tensor", ["structured", "gaussian"])
def test_monte_carlo_variance_matches_exact_formula(spec, tensor):
    x = structured(16, 24, seed=7) if tensor == "structured" else gaussian(16, 24, seed=8)
    exact = exact_variance(x, spec)
    torch.manual_seed(12)
    mc, se = mc_variance_se(x, spec, 300)
    assert exact > 0 and se > 0
    assert abs(mc - exact) <= 5 * se, f"MC {mc:.6g} +- {se:.2g} vs exact {exact:.6g}"
    # the standard error is a few per cent here, so this is a real test of the formula
    assert se < 0.1 * exact


def test_mc_variance_helper_agrees_with_the_se_variant():
    x = gaussian(8, 8, seed=9)
    torch.manual_seed(3)
    a = mc_variance(x, psq(4), 50)
    torch.manual_seed(3)
    b, _ = mc_variance_se(x, psq(4), 50)
    assert a == pytest.approx(b, rel=1e-10)


@pytest.mark.parametrize("spec", [p for p in BUILTIN_SPECS if not p.values[0].is_stochastic])
def test_nearest_rounding_has_zero_variance(spec):
    x = gaussian(6, 10, seed=10, dtype=torch.float32)
    assert mc_variance(x, spec, 5) == 0.0
    assert exact_variance(x, spec) == 0.0


# ====================================================== variance bounds (docs/quantizers.md §6 claim 3, §3.4, §3.5)
BOUND_TENSORS = ["gaussian", "structured"]


def _bound_tensor(name: str) -> torch.Tensor:
    return gaussian(32, 48, seed=13) if name == "gaussian" else structured(32, 48, seed=14)


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("name", BOUND_TENSORS)
def test_variance_bounds(bits, name):
    x = _bound_tensor(name)
    n, d = x.shape
    B = 2**bits - 1
    R = (x.max() - x.min()).item()
    R_rows = (x.amax(1) - x.amin(1)) ** 2
    R_cols = (x.amax(0) - x.amin(0)) ** 2
    ptq_bound = n * d * R**2 / (4 * B**2)
    psq_bound = d * R_rows.sum().item() / (4 * B**2)
    col_bound = n * R_cols.sum().item() / (4 * B**2)
    assert exact_variance(x, ptq(bits)) <= ptq_bound
    assert exact_variance(x, psq(bits)) <= psq_bound <= ptq_bound
    assert exact_variance(x, per_column(bits)) <= col_bound <= ptq_bound
    # BHQ's rigorous bound: (D / 4B^2) sum_i ||T^-1 e_i||^2 R((TX)_i)^2
    _, t_inv, y = bhq_parts(x)
    bhq_bound = d / (4 * B**2) * ((t_inv**2).sum(0) * (y.amax(1) - y.amin(1)) ** 2).sum().item()
    assert exact_variance(x, bhq(bits)) <= bhq_bound


@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"b{b}")
def test_psq_variance_is_about_two_thirds_of_its_bound_on_gaussian_data(bits):
    # docs/quantizers.md §3.1: with f spread uniformly E[f(1-f)] = 1/6, i.e. 2/3 of the 1/4 bound.
    x = gaussian(32, 48, seed=15)
    B = 2**bits - 1
    bound = x.shape[1] * ((x.amax(1) - x.amin(1)) ** 2).sum().item() / (4 * B**2)
    assert 0.55 < exact_variance(x, psq(bits)) / bound < 0.78


@pytest.mark.parametrize("bits", [4, 5, 6, 7], ids=lambda b: f"b{b}-to-b{b + 1}")
@pytest.mark.parametrize("family", ["ptq", "psq", "per_column", "bhq"])
def test_each_extra_bit_divides_variance_by_about_four(bits, family):
    make = {"ptq": ptq, "psq": psq, "per_column": per_column, "bhq": bhq}[family]
    x = gaussian(32, 48, seed=16)
    ratio = exact_variance(x, make(bits)) / exact_variance(x, make(bits + 1))
    assert 2.5 < ratio < 6.0, ratio


@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("seed", [0, 1])
def test_one_dominant_row_orders_bhq_psq_ptq(bits, seed):
    n = 64
    x = gaussian(n, 32, seed=20 + seed)
    x[7] *= 1000.0
    v_ptq, v_psq, v_bhq = (exact_variance(x, make(bits)) for make in (ptq, psq, bhq))
    # BHQ spreads the big row over all 64 rows: a gain of order N over PSQ (docs/quantizers.md §3.5).
    assert v_bhq * n / 4 <= v_psq, (v_psq / v_bhq)
    # PTQ wastes the tensor's range on every small row. With the zero-on-grid grid the small rows
    # sit next to level qzero (f ~ |x| / step), so their cost is ~ |x| * step rather than step^2 / 6:
    # the gap over PSQ grows with B (about 2x at 4 bits, about 15x at 8 bits for this tensor).
    assert v_ptq >= (5.0 if bits == 8 else 1.5) * v_psq, (v_ptq / v_psq)


@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"b{b}")
def test_identical_row_ranges_make_the_three_quantizers_comparable(bits):
    x = gaussian(32, 48, seed=22)
    x = (x - x.amin(1, keepdim=True)) / (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) * 2 - 1  # every row spans [-1, 1]
    v = [exact_variance(x, make(bits)) for make in (ptq, psq, bhq)]
    assert max(v) / min(v) < 2.0, v


# =========================================================================== edge cases, every built-in spec
@pytest.mark.parametrize("spec", BUILTIN_SPECS)
@pytest.mark.parametrize("n_rows", [1, 2, 3], ids=lambda n: f"N{n}")
def test_few_rows(spec, n_rows):
    x = gaussian(n_rows, 8, seed=30 + n_rows, dtype=torch.float32) * 3
    out = fqt.quantize(x, spec)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.isfinite().all()
    assert_within_bound(out, x, spec)


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
@pytest.mark.parametrize("shape", [(1, 6), (5, 6), (3, 2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_all_zero_input_gives_exact_zeros(spec, shape):
    x = torch.zeros(shape)
    out = fqt.quantize(x, spec)
    assert out.shape == x.shape
    assert not out.isnan().any()
    assert torch.equal(out, x)


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
@pytest.mark.parametrize("value", [-0.37, 5.0, 1e-3])
def test_constant_tensor(spec, value):
    x = torch.full((4, 6), value)
    out = fqt.quantize(x, spec)
    assert out.isfinite().all()
    if _is_asym(spec) and not _is_bhq(spec):
        assert torch.equal(out, x), "a constant group is reproduced exactly by min-max quantizers"
    elif _is_asym(spec):  # BHQ: T X has constant rows, quantized exactly; T^-1 only rounds
        torch.testing.assert_close(out, x, rtol=1e-6, atol=0)
    else:
        assert_within_bound(out, x, spec)


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
def test_constant_rows(spec):
    x = torch.tensor([0.5, -2.0, 0.0, 3.25, 1e-4])[:, None].expand(5, 6).contiguous()
    out = fqt.quantize(x, spec)
    assert out.isfinite().all()
    if _is_asym(spec) and spec.granularity is Granularity.ROW and not _is_bhq(spec):
        assert torch.equal(out, x)
    elif _is_asym(spec) and _is_bhq(spec):
        torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    else:
        assert_within_bound(out, x, spec)


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_input_dtypes(spec, dtype):
    x = structured(6, 10, seed=31, decades=1.0).to(dtype)
    torch.manual_seed(5)
    out = fqt.quantize(x, spec)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.isfinite().all()
    assert_within_bound(out, x, spec)
    if dtype in (torch.float16, torch.bfloat16):
        # low-precision inputs are upcast: same result as quantizing the fp32 copy, then casting
        torch.manual_seed(5)
        ref = fqt.quantize(x.float(), spec).to(dtype)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_is_never_silently_finite(spec, bad):
    x = gaussian(4, 6, seed=32, dtype=torch.float32)
    x[1, 2] = bad
    out = fqt.quantize(x, spec)
    assert not out[1, 2].isfinite(), "the non-finite entry came back finite"
    group = {
        Granularity.TENSOR: out,
        Granularity.ROW: out[1],
        Granularity.COLUMN: out[:, 2],
        Granularity.CHANNEL: out[:, 2],  # a matrix: one scale per column
    }[spec.granularity]
    assert not group.isfinite().any(), f"part of the non-finite entry's group came back finite: {group}"


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
@pytest.mark.parametrize("exponent", [100, -100], ids=["huge", "tiny"])
def test_huge_and_tiny_magnitudes(spec, exponent):
    base = gaussian(6, 10, seed=33, dtype=torch.float32)
    factor = 2.0**exponent  # ~1e30 / ~1e-30, exactly representable
    x = base * factor
    torch.manual_seed(9)
    out = fqt.quantize(x, spec)
    assert out.isfinite().all()
    assert_within_bound(out, x, spec)
    rel = (out - x).abs().max() / x.abs().max()
    assert rel < (0.3 if spec.format.is_float else 4 / spec.levels)  # fp8 e5m2 has 2 mantissa bits
    if not _is_bhq(spec):
        # scaling by a power of two commutes exactly with every transform-free quantizer
        torch.manual_seed(9)
        ref = fqt.quantize(base, spec)
        assert torch.equal(out, ref * factor)


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
@pytest.mark.parametrize("magnitude", [1e30, 1e-30], ids=["1e30", "1e-30"])
def test_decimal_extreme_magnitudes(spec, magnitude):
    x = gaussian(6, 10, seed=34, dtype=torch.float32) * magnitude
    out = fqt.quantize(x, spec)
    assert out.isfinite().all()
    assert_within_bound(out, x, spec)


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
def test_manual_seed_reproducibility(spec):
    x = gaussian(8, 12, seed=35, dtype=torch.float32)
    torch.manual_seed(1234)
    a = fqt.quantize(x, spec)
    torch.manual_seed(1234)
    b = fqt.quantize(x, spec)
    assert torch.equal(a, b)
    torch.manual_seed(4321)
    c = fqt.quantize(x, spec)
    if spec.is_stochastic:
        assert not torch.equal(a, c), "a different seed must give different stochastic draws"
    else:
        assert torch.equal(a, c)


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
def test_generator_reproducibility(spec):
    x = gaussian(8, 12, seed=36, dtype=torch.float32)
    a = fqt.quantize(x, spec, generator=_gen(77))
    global_state = torch.get_rng_state()
    b = fqt.quantize(x, spec, generator=_gen(77))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), global_state), "an explicit generator must not consume the global one"
    g = _gen(77)
    c1 = fqt.quantize(x, spec, generator=g)
    c2 = fqt.quantize(x, spec, generator=g)
    assert torch.equal(c1, a)
    if spec.is_stochastic:
        assert not torch.equal(c1, c2), "the generator must advance between calls"


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
@pytest.mark.parametrize("kind", ["strided", "transposed", "expanded-3d"])
def test_non_contiguous_input_equals_contiguous(spec, kind):
    base = gaussian(10, 16, seed=37, dtype=torch.float32)
    if kind == "strided":
        x = base[::2, ::3]
    elif kind == "transposed":
        x = base.t()
    else:
        x = base[:6, :4, None].expand(6, 4, 3)
    assert not x.is_contiguous()
    torch.manual_seed(21)
    a = fqt.quantize(x, spec)
    torch.manual_seed(21)
    b = fqt.quantize(x.contiguous(), spec)
    assert torch.equal(a, b)


@pytest.mark.parametrize("spec", [p for p in BUILTIN_SPECS if p.values[0].granularity is not Granularity.CHANNEL])
def test_public_quantize_flattens_trailing_dims(spec):
    x = gaussian(6, 12, seed=38, dtype=torch.float32).reshape(6, 3, 4)
    torch.manual_seed(22)
    a = fqt.quantize(x, spec)
    torch.manual_seed(22)
    b = fqt.quantize(x.reshape(6, 12), spec)
    assert torch.equal(a, b.reshape(6, 3, 4))


@pytest.mark.parametrize("spec", [p for p in BUILTIN_SPECS if p.values[0].granularity is Granularity.CHANNEL])
@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 2, 3)], ids=["1d", "2d", "3d"])
def test_channel_granularity_is_one_scale_per_dim1_channel(spec, shape):
    """CHANNEL on a convolution-shaped tensor: COLUMN of the channels-last matrix, so every
    spatial position of a channel shares its scale; on a matrix it is COLUMN itself."""
    x = gaussian(shape[0], int(torch.tensor(shape[1:]).prod()), seed=39, dtype=torch.float32).reshape(shape)
    torch.manual_seed(23)
    a = fqt.quantize(x, spec)
    torch.manual_seed(23)
    channels_last = x.movedim(1, -1).reshape(-1, shape[1])
    b = fqt.quantize(channels_last, spec.with_(granularity=Granularity.COLUMN))
    assert torch.equal(a, b.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1))
    codes, scale, _, _ = quantize_ref(x, spec)
    assert scale.shape == (1, shape[1], *(1,) * (len(shape) - 2))
    m = gaussian(5, 7, seed=40, dtype=torch.float32)
    torch.manual_seed(24)
    c = fqt.quantize(m, spec)
    torch.manual_seed(24)
    assert torch.equal(c, fqt.quantize(m, spec.with_(granularity=Granularity.COLUMN)))


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["no-rows", "no-columns"])
def test_empty_input(spec, shape):
    x = torch.empty(shape)
    out = fqt.quantize(x, spec)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_public_quantize_rejects_bad_arguments():
    with pytest.raises(TypeError):
        fqt.quantize(torch.ones(2, 2), "int8/sym/tensor/nearest/none")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fqt.quantize(torch.ones(2, 2, dtype=torch.int32), QuantSpec())


# =========================================================================== codes, layouts, custom op
def _code_specs() -> list:
    out = []
    for fmt, schemes, bit_list in [
        ("int", ["sym", "asym", "zog"], [2, 4, 8]),
        ("uint", ["asym", "zog"], [2, 5, 8]),
        ("fp8_e4m3", ["sym"], [8]),
        ("fp8_e5m2", ["sym"], [8]),
    ]:
        for scheme in schemes:
            for bits in bit_list:
                for rounding in ["nearest", "stochastic"]:
                    spec = QuantSpec(format=fmt, bits=bits, scheme=scheme, rounding=rounding)
                    out.append(pytest.param(spec, id=spec_id(spec)))
    return out


def _code_range(spec: QuantSpec) -> tuple[float, float]:
    if spec.format.is_float:
        return -spec.qmax, spec.qmax
    if spec.scheme is Scheme.SYMMETRIC:
        return -spec.qmax, spec.qmax
    return spec.code_offset, spec.code_offset + spec.levels


@pytest.mark.parametrize("spec", _code_specs())
@pytest.mark.parametrize("gran", ["tensor", "row", "column"])
def test_quantize_ref_codes_dtype_and_range(spec, gran):
    spec = spec.with_(granularity=gran)
    x = structured(6, 9, seed=40, decades=1.0).to(torch.float32)
    x[2, 3] = 0.0
    codes, scale, zp, offset = quantize_ref(x, spec, generator=_gen(1))
    assert codes.dtype == spec.code_dtype and codes.shape == x.shape
    lo, hi = _code_range(spec)
    c = codes.to(torch.float64)
    assert c.isfinite().all()
    assert c.min() >= lo and c.max() <= hi
    assert (scale >= 0).all()
    if spec.rounding.value == "nearest" and not spec.format.is_float:
        # min-max grids use both ends: each group's extremes land on the first and last level
        groups = {"tensor": (None,), "row": (1,), "column": (0,)}[gran]
        dims = groups[0]
        cmin = c.amin() if dims is None else c.amin(dims)
        cmax = c.amax() if dims is None else c.amax(dims)
        if spec.scheme is Scheme.ASYMMETRIC:
            assert (cmin == lo).all() and (cmax == hi).all()
        elif spec.scheme is Scheme.SYMMETRIC:
            assert (torch.maximum(cmin.abs(), cmax.abs()) == spec.qmax).all()
        else:  # zero-on-grid: one end is used exactly, the other within the grid
            assert ((cmin == lo) | (cmax == hi)).all()


NEAREST_LAYOUT_SPECS = [
    QuantSpec(bits=8),
    QuantSpec(format="uint", bits=4, scheme="asym"),
    QuantSpec(bits=3, scheme="zog"),
    QuantSpec(format="uint", bits=8, scheme="zog"),
    QuantSpec(format="fp8_e4m3"),
    QuantSpec(format="fp8_e5m2"),
]


@pytest.mark.parametrize("base_spec", [pytest.param(s, id=spec_id(s)) for s in NEAREST_LAYOUT_SPECS])
@pytest.mark.parametrize("gran", ["tensor", "row", "column"])
@pytest.mark.parametrize("shape", [(5, 7), (2, 5, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("layout", list(Layout), ids=lambda lay: lay.name)
def test_dequantize_of_quantize_equals_fake_quantize_bit_exactly(base_spec, gran, shape, layout):
    spec = base_spec.with_(granularity=gran)
    x = torch.randn(shape, generator=_gen(41)) * torch.linspace(0.1, 5, shape[-1])
    codes, scale, zp, offset = quantize_ref(x, spec, layout)
    assert codes.shape == x.shape
    expected_shape = scale_shape(x.shape, spec.granularity, layout)
    for t in (scale, zp, offset):
        assert tuple(t.shape) == tuple(expected_shape)
    deq = dequantize_ref(codes, scale, zp, offset, x.dtype)
    fake = fake_quantize_ref(x, spec, layout)
    assert torch.equal(deq, fake)


@pytest.mark.parametrize("base_spec", [pytest.param(s, id=spec_id(s)) for s in NEAREST_LAYOUT_SPECS[:3]])
@pytest.mark.parametrize("gran", ["tensor", "row", "column"])
def test_layouts_agree_with_explicit_reshapes(base_spec, gran):
    spec = base_spec.with_(granularity=gran)
    x = torch.randn(2, 5, 7, generator=_gen(42)) * torch.linspace(0.1, 5, 7) * torch.tensor([1.0, 30.0])[:, None, None]
    dim0 = fake_quantize_ref(x, spec, Layout.DIM0)
    assert torch.equal(dim0, fake_quantize_ref(x.reshape(2, 35), spec, Layout.DIM0).reshape(x.shape))
    pen = fake_quantize_ref(x, spec, Layout.PENULTIMATE)
    assert torch.equal(pen, fake_quantize_ref(x.reshape(10, 7), spec, Layout.DIM0).reshape(x.shape))
    last = fake_quantize_ref(x, spec, Layout.LAST)
    xt = x.transpose(-1, -2).contiguous()
    assert torch.equal(last, fake_quantize_ref(xt, spec, Layout.PENULTIMATE).transpose(-1, -2))
    if gran != "tensor":
        assert not torch.equal(pen, last), "PENULTIMATE and LAST must group differently"


@pytest.mark.parametrize(
    ("spec", "layout", "shape"),
    [
        pytest.param(QuantSpec(bits=8, granularity="row"), Layout.DIM0, (4, 6), id="int8-row-DIM0"),
        pytest.param(
            QuantSpec(format="uint", bits=4, scheme="asym", granularity="column"), Layout.PENULTIMATE, (2, 4, 6),
            id="uint4-column-PENULTIMATE",
        ),
        pytest.param(QuantSpec(format="uint", bits=8, scheme="zog"), Layout.LAST, (4, 6), id="uint8-zog-tensor-LAST"),
        pytest.param(QuantSpec(format="fp8_e4m3", granularity="row"), Layout.LAST, (2, 4, 6), id="e4m3-row-LAST"),
        pytest.param(
            QuantSpec(bits=4, scheme="zog", granularity="row"), Layout.PENULTIMATE, (3, 5), id="int4-zog-row-PENULTIMATE"
        ),
    ],
)
def test_quantize_custom_op_opcheck(spec, layout, shape):
    x = torch.randn(shape, generator=_gen(43))
    result = torch.library.opcheck(torch.ops.fqt.quantize.default, (x, spec.key(), int(layout)))
    assert all(v == "SUCCESS" for v in result.values()), result
    codes, scale, zp, offset = quantize_op(x, spec.key(), int(layout))
    ref = quantize_ref(x, spec, layout)
    for got, want in zip((codes, scale, zp, offset), ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("granularity", ["tensor", "row", "column", "position"])
@pytest.mark.parametrize("scheme", ["sym", "asym", "zog"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("memory", ["contiguous", "channels_last", "3d"])
def test_convolution_operands_quantize_in_place_like_the_natural_matrix(granularity, scheme, rounding, memory):
    """Per tensor / per sample / per (channel, position) column (DIM0: the paper's per-column
    gradients) and per channel (CHANNELS) quantizers of a convolution operand run on the tensor
    itself; codes, statistics and stochastic draws are those of the natural-matrix path (which
    the Triton kernels share), bit for bit."""
    import fqt_compiler.reference as reference

    layout = Layout.CHANNELS if granularity == "column" else Layout.DIM0
    granularity = "column" if granularity == "position" else granularity
    spec = QuantSpec(granularity=granularity, scheme=scheme, rounding=rounding, bits=5)
    x = gaussian(3, 5 * 4 * 6, seed=41, dtype=torch.float32).reshape(3, 5, 4, 6)
    if memory == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif memory == "3d":
        x = x.reshape(3, 5, 2, 2, 6)
    assert reference._groups_in_place(x, spec, layout) is not None
    seed = torch.tensor([4242])
    in_place = quantize_ref(x, spec, layout, seed=seed), fake_quantize_ref(x, spec, layout, seed=seed)
    original = reference._groups_in_place
    reference._groups_in_place = lambda *args: None
    try:
        natural = quantize_ref(x, spec, layout, seed=seed), fake_quantize_ref(x, spec, layout, seed=seed)
    finally:
        reference._groups_in_place = original
    for got, want in zip(in_place[0], natural[0]):
        assert got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(in_place[1], natural[1])


def _bits(v: torch.Tensor) -> list:
    """Values with the sign of zero and NaN-ness visible (every NaN alike)."""
    return [("nan" if math.isnan(x) else (x, math.copysign(1.0, x))) for x in v.flatten().tolist()]


INF, NAN = math.inf, math.nan
# (scheme, group, its pre-rounding values): constant groups, signed zeros, infinities, NaN
SPECIAL_GROUPS = [
    ("sym", [-0.0, 0.0], [0.0, 0.0]),  # constant: scale +0, every value +0
    ("sym", [-0.0, 2.0], [-0.0, 127.0]),  # a signed zero keeps its sign under a positive scale
    ("sym", [INF, 1.0, 0.0, -1.0], [INF, INF, NAN, -INF]),  # infinite scale: g * inf
    ("sym", [NAN, 1.0], [NAN, NAN]),
    ("asym", [3.0, 3.0], [0.0, 0.0]),
    ("asym", [-INF, 0.0, 1.0], [NAN, NAN, NAN]),  # (g - (-inf)) / inf
    ("asym", [0.0, 1.0, INF], [0.0, 0.0, NAN]),
    ("asym", [NAN, 1.0], [NAN, NAN]),
    ("zog", [0.0, -0.0], [0.0, 0.0]),  # constant: the zero point, 0
    ("zog", [-1.0, 1.0], [0.0, 254.0]),
    ("zog", [-2.0, 0.0, 1.0], [0.0, 169.0, 253.5]),
    ("zog", [INF, -1.0], [NAN, 1.0]),  # infinite scale: g / inf + zero point
    ("zog", [NAN, 1.0], [NAN, NAN]),
]


@pytest.mark.parametrize("scheme, group, expected", SPECIAL_GROUPS, ids=[f"{s}-{g}" for s, g, _ in SPECIAL_GROUPS])
def test_scaled_values_of_special_groups(scheme, group, expected):
    """The pre-rounding value for every case of a group's scale (positive, zero, infinite,
    NaN), signed zeros included (an fp8 code keeps the sign): the scale's tests are written
    per group, to keep compiled element loops short, and these values pin what they give."""
    v, _, _, _ = scaled_values(torch.tensor([group]), QuantSpec(scheme=scheme))
    assert _bits(v) == _bits(torch.tensor(expected))


def test_fp8_codes_keep_the_sign_of_zero_only_under_a_positive_scale():
    spec = QuantSpec(format="fp8_e4m3", granularity="row")
    codes, _, _, _ = quantize_ref(torch.tensor([[-0.0, 2.0], [-0.0, 0.0]]), spec, Layout.DIM0)
    assert codes.view(torch.uint8).tolist() == [[0x80, codes[0, 1].view(torch.uint8).item()], [0x00, 0x00]]
