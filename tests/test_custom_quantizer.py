"""Custom quantizers: a stochastic ternary quantizer registered by name changes the gradients
exactly as its reference predicts, end to end through torch.compile, and shows in explain."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.recipes import GradInputSpecs, Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def ternary(x, spec, generator=None):
    """Per row: values in {-s, 0, s} with s = max |x|; Q(x) = s sign(x) with probability |x|/s."""
    s = x.abs().amax(dim=1, keepdim=True)
    p = (x.abs() / torch.where(s > 0, s, 1)).clamp(max=1)
    keep = torch.rand(x.shape, generator=generator, device=x.device) < p
    return torch.where(keep, s * x.sign(), torch.zeros_like(x))


@pytest.fixture()
def ternary_recipe():
    fqt.register_quantizer("ternary", ternary, unbiased=True, replace=True)
    spec = fqt.QuantSpec(quantizer="ternary", bits=2, granularity="row", rounding="stochastic")
    base = fqt.recipe("qat")
    yield Recipe(
        name="ternary-gi", output=base.output, grad_input=GradInputSpecs(grad_output=spec, weight=base.grad_input.weight)
    )
    fqt.unregister_quantizer("ternary")


class Square(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.lin(x)


def _grad_input_draws(recipe, n, mode="reference"):
    """grad_x = Q(G) W_hat: recover Q(G) = grad_x W_hat^-1 from each backward pass."""
    d = 6
    torch.manual_seed(0)
    model = Square(d)
    x = (torch.randn(d, d) + 2 * torch.eye(d)).requires_grad_(True)
    G = torch.randn(d, d)
    compiled = torch.compile(model, backend=fqt.backend(recipe=recipe, execution=mode, inductor=False))
    w_hat = fqt.quantize(model.lin.weight.detach(), recipe.output.weight).double()
    draws = []
    for i in range(n):
        x.grad = None
        torch.manual_seed(100 + i)
        (compiled(x) * G).sum().backward()
        draws.append(x.grad.double() @ torch.linalg.inv(w_hat))
    return G.double(), torch.stack(draws)


def test_custom_quantizer_changes_the_gradient_as_its_reference_predicts(ternary_recipe):
    G, draws = _grad_input_draws(ternary_recipe, 200)
    s = G.abs().amax(dim=1, keepdim=True)
    for q in draws[:20]:  # every draw lies on the ternary grid {-s, 0, s} of its row
        on_grid = torch.isclose(q, torch.zeros_like(q), atol=1e-4) | torch.isclose(q.abs(), s.expand_as(q), rtol=1e-4)
        assert on_grid.all()
        assert (q * G >= -1e-4).all()  # never the opposite sign
    assert not torch.allclose(draws[0], draws[1])  # stochastic
    # unbiased: the mean over draws approaches G within a few standard errors
    # the quantizer's exact variance is s|x| - x^2 (rare keeps make the sample variance useless
    # for small entries); the floor covers the round-off of recovering Q(G) through W_hat^-1
    se = ((s * G.abs() - G**2).clamp_min(0) / len(draws)).sqrt() + 1e-4 * G.abs().max()
    z = (draws.mean(0) - G).abs() / se
    assert z.max() < 5
    # and the empirical variance matches that prediction
    assert torch.allclose(draws.var(0).sum(), (s * G.abs() - G**2).sum(), rtol=0.2)


def test_custom_quantizer_shows_in_explain_as_simulated(ternary_recipe):
    report = fqt.explain(
        Square(6), torch.randn(4, 6, requires_grad=True), recipe=ternary_recipe, execution="kernels", inductor=False
    )
    (gi,) = [g for _, g in report.rows() if g.kind is fqt.GemmKind.GRAD_INPUT]
    (grad,) = [o for o in gi.operands if o.role is fqt.TensorRole.GRAD_OUTPUT]
    assert grad.spec.short().startswith("custom:ternary")
    assert gi.status is fqt.GemmStatus.SIMULATED and "custom:ternary" in gi.reason


@pytest.mark.interpreter
def test_custom_quantizer_kernel_hook_is_used_where_kernels_run(ternary_recipe):
    """The hook replaces the reference in kernels mode where Triton runs (here: the interpreter)."""
    from fqt_compiler.codegen import swap_to_kernel_ops

    calls = []

    def kernel(x, spec, generator=None):
        calls.append(tuple(x.shape))
        return ternary(x, spec, generator)

    fqt.register_quantizer("ternary", ternary, unbiased=True, kernel=kernel, replace=True)
    gm = torch.fx.symbolic_trace(lambda t: torch.ops.fqt.fake_quantize.default(t, ternary_recipe.grad_input.grad_output.key(), 1))
    assert swap_to_kernel_ops(gm, include_cpu=True) == 0  # no meta values: nothing to decide on
    out = torch.ops.fqt.fake_quantize_kernel.default(torch.randn(3, 4), ternary_recipe.grad_input.grad_output.key(), 1)
    assert calls == [(3, 4)] and out.shape == (3, 4)


def test_registry_errors():
    with pytest.raises(fqt.SpecError, match="no quantizer named 'nope'"):
        fqt.QuantSpec(quantizer="nope")
    fqt.register_quantizer("dummy", lambda x, spec, generator=None: x, unbiased=False)
    try:
        with pytest.raises(fqt.SpecError, match="already registered"):
            fqt.register_quantizer("dummy", lambda x, spec, generator=None: x, unbiased=False)
        spec = fqt.QuantSpec(quantizer="dummy")
        assert fqt.QuantSpec.from_key(spec.key()) == spec
        fqt.register_quantizer("bad_shape", lambda x, spec, generator=None: x[:1], unbiased=False)
        with pytest.raises(ValueError, match="returned"):
            fqt.quantize(torch.randn(4, 4), fqt.QuantSpec(quantizer="bad_shape"))
    finally:
        fqt.unregister_quantizer("dummy")
        fqt.unregister_quantizer("bad_shape")
    with pytest.raises(fqt.SpecError, match="identifier"):
        fqt.register_quantizer("not a name", lambda x, spec, generator=None: x, unbiased=False)


@pytest.mark.parametrize("execution", ["reference", "kernels"])
def test_a_quantizer_returning_nan_for_finite_input_is_named(execution):
    """Regression: a custom quantizer that divides by a zero scale went unnoticed until the
    gradients were NaN. The first call that makes NaN / Inf from finite values raises, naming it."""
    def broken(x, spec, generator=None):
        return x / (x.abs().amax(dim=1, keepdim=True) * 0)  # 0 / 0 and x / 0

    fqt.register_quantizer("broken", broken, unbiased=True, replace=True)
    try:
        spec = fqt.QuantSpec(quantizer="broken", granularity="row", rounding="stochastic")
        base = fqt.recipe("qat")
        rec = Recipe(
            name="broken-gi", output=base.output, grad_input=GradInputSpecs(grad_output=spec, weight=base.grad_input.weight)
        )
        model = Square(4)
        out = torch.compile(model, backend=fqt.backend(recipe=rec, execution=execution, inductor=False))(
            torch.randn(3, 4, requires_grad=True)
        )
        with pytest.raises(fqt.QuantizerError, match=r"custom quantizer 'broken' returned NaN/Inf for 12 of 12 finite inputs"):
            out.sum().backward()
        # NaN in, NaN out is the contract, not a violation
        x = torch.full((2, 3), float("nan"))
        fqt.register_quantizer("broken", lambda x, spec, generator=None: x * 1.0, unbiased=True, replace=True)
        assert torch.isnan(fqt.quantize(x, spec)).all()
    finally:
        fqt.unregister_quantizer("broken")
