"""The statistical framework: exact variances vs Monte Carlo, bounds, the Theorem 2
decomposition, the bias test (accepting the paper's recipes, rejecting biased quantizers), the
advisor and the ``fqt variance`` command."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.recipes import GradInputSpecs, GradWeightSpecs, Recipe
from fqt_compiler.stats import advise_bits, gradient_stats
from fqt_compiler.stats_formulas import bound_expression, exact_variance, variance_bound
from fqt_compiler.tools import cli
from tests.helpers import variance_factory
from tests.helpers.recipes import nearest_gradients

pytestmark = pytest.mark.usefixtures("one_thread")


def _structured(n=48, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-3, 0, n)[:, None]  # rows over 3 decades
    x[5] *= 500  # one dominant row
    return x


def _gaussian(n=48, d=24, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _mc(x, spec, n=400):
    torch.manual_seed(3)
    return torch.stack([fqt.quantize(x, spec).double() for _ in range(n)]).var(0).sum().item()


SPECS = {
    "ptq": fqt.recipe("ptq4").grad_input.grad_output,
    "psq": fqt.recipe("psq4").grad_input.grad_output,
    "column": fqt.recipe("psq4").grad_weight.grad_output,
    "bhq": fqt.recipe("bhq4").grad_input.grad_output,
    "int8-sym": fqt.recipe("int8").grad_input.grad_output,
}


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("make", [_structured, _gaussian], ids=["structured", "gaussian"])
def test_monte_carlo_matches_the_exact_variance_and_the_bound_holds(name, make):
    x, spec = make(), SPECS[name]
    exact = exact_variance(x, spec)
    assert abs(_mc(x, spec) - exact) <= 0.12 * exact  # 400 draws: a few % sampling error
    assert exact <= variance_bound(x, spec) * (1 + 1e-9)


@pytest.mark.parametrize("name", ["ptq", "psq", "bhq"])
def test_each_extra_bit_cuts_the_variance_about_4x(name):
    x = _gaussian(64, 64)
    family = name
    ratios = []
    for b in (4, 5, 6, 7):
        lo, hi = (fqt.recipe(f"{family}{bits}").grad_input.grad_output for bits in (b, b + 1))
        ratios.append(exact_variance(x, lo) / exact_variance(x, hi))
    assert all(2.5 < r < 6 for r in ratios), ratios
    b_lo, b_hi = (variance_bound(x, fqt.recipe(f"{family}{bits}").grad_input.grad_output) for bits in (6, 7))
    assert b_lo / b_hi == pytest.approx((2**7 - 1) ** 2 / (2**6 - 1) ** 2, rel=0.05)


def test_one_dominant_row_orders_bhq_psq_ptq():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 1e-2
    x[7] = torch.randn(32) * 10
    v = {k: exact_variance(x, fqt.recipe(f"{k}8").grad_input.grad_output) for k in ("ptq", "psq", "bhq")}
    assert v["bhq"] * 5 < v["psq"] and v["psq"] * 5 < v["ptq"], v


def test_bounds_are_sympy_expressions():
    expr = bound_expression(SPECS["psq"])
    assert "Sum" in str(expr) and "2**b - 1" in str(expr)
    assert str(bound_expression(SPECS["ptq"])) == "D*N*R**2/(4*(2**b - 1)**2)"


# --------------------------------------------------------------------------- network level
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 24), nn.Linear(24, 24), nn.Linear(24, 5)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = MLP()
    g = torch.Generator().manual_seed(seed + 10)
    batches = [(torch.randn(32, 12, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(6)]
    return model, (lambda m, b: F.cross_entropy(m(b[0]), b[1])), batches


def test_decomposition_adds_up_and_quantizer_stats_are_exact():
    model, loss_fn, batches = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = gradient_stats(model, loss_fn, batches, "psq4", draws=48, quantizer_draws=200)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # state restored
    assert stats.sampling_variance > 0 and stats.quantization_variance > 0
    # Theorem 2: per-layer contributions (one layer exact at a time) sum to the total
    assert stats.profile_sum == pytest.approx(stats.quantization_variance, rel=0.3)
    # every quantizer seen: 2 per Linear with grad_input (fc2, fc3) + 1 for fc1 (grad_weight only)
    assert len(stats.quantizers) == 5
    for q in stats.quantizers:
        assert q.monte_carlo == pytest.approx(q.exact, rel=0.2) and q.exact <= q.bound * (1 + 1e-9)
    assert "sampling var" in stats.table()


@pytest.mark.parametrize("recipe", ["ptq4", "psq4", "bhq4"])
def test_bias_test_accepts_the_paper_recipes(recipe):
    model, loss_fn, batches = _setup(seed=1)
    stats = gradient_stats(model, loss_fn, batches, recipe, draws=32, profile=False, quantizers=False)
    assert not stats.biased, stats.table()


def test_bias_test_rejects_nearest_rounding_and_a_biased_stochastic_quantizer():
    model, loss_fn, batches = _setup(seed=1)
    assert gradient_stats(model, loss_fn, batches, nearest_gradients("psq4"), draws=8, profile=False, quantizers=False).biased

    def biased(x, spec, generator=None):  # stochastic rounding whose noise is shifted by 1/4
        s = x.abs().amax(dim=1, keepdim=True) / 7
        v = x / torch.where(s > 0, s, 1)
        return torch.floor(v + 0.25 + torch.rand(v.shape, generator=generator)).clamp(-7, 7) * s

    fqt.register_quantizer("shifted", biased, unbiased=False, replace=True)
    try:
        spec = fqt.QuantSpec(quantizer="shifted", granularity="row", rounding="stochastic")
        base = fqt.recipe("psq4")
        r = Recipe(name="shifted", output=base.output, grad_input=GradInputSpecs(grad_output=spec, weight=base.grad_input.weight),
                   grad_weight=GradWeightSpecs(grad_output=spec, activation=base.grad_weight.activation))
        stats = gradient_stats(model, loss_fn, batches, r, draws=32, profile=False, quantizers=False)
        assert stats.biased and stats.bias_z > 10
    finally:
        fqt.unregister_quantizer("shifted")


def test_advisor_more_bits_for_a_tighter_budget():
    model, loss_fn, batches = _setup()
    loose, totals, sampling = advise_bits(model, loss_fn, batches, alpha=1.0, draws=8)
    tight, tight_totals, _ = advise_bits(model, loss_fn, batches, alpha=0.001, draws=8)
    assert [a.layer for a in loose] == ["fc1", "fc2", "fc3"]
    for a, b in zip(loose, tight):
        for fam in ("ptq", "psq", "bhq"):
            assert (b.bits[fam] or 9) >= (a.bits[fam] or 9)
    assert all(t <= 1.0 * sampling + 1e-12 for t in totals.values())
    with pytest.raises(ValueError, match="alpha"):
        advise_bits(model, loss_fn, batches, alpha=0)


@pytest.mark.slow  # about 15 s: the whole fqt variance report (bits sweep, advice, plots) on a small MLP
def test_variance_command_writes_its_tables_and_plots(tmp_path, capsys):
    script = tmp_path / "model.py"
    script.write_text(variance_factory.SOURCE)
    assert cli.main(["variance", f"{script}:make", "--draws", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bit-width advice" in out and "variance by gradient bits" in out and "exact var" in out
    assert {p.name for p in tmp_path.glob("*.png")} == {"variance_vs_bits.png", "per_layer.png", "split.png"}


def test_the_default_variance_model_is_the_demo_cnn_on_its_data():
    from fqt_compiler.tools.demo import DigitsNet
    from fqt_compiler.tools.variance import demo_factory

    model, loss_fn, batches = demo_factory(n_batches=2)
    assert isinstance(model, DigitsNet) and len(batches) == 2 and batches[0][0].shape[0] == 64
    assert torch.isfinite(loss_fn(model, batches[0]))
