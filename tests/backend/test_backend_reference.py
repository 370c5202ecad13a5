"""The ``fqt`` backend end to end in reference mode, against hand-written references.

* ``exact`` equals plain eager autograd; ``qat`` equals a hand-written fake-quant model with a
  straight-through estimator (docs/quantizers.md §2.1);
* Theorem 1 (docs/quantizers.md §4): the mean of many FQT gradients on one minibatch converges to the
  QAT gradient, while single FQT gradients differ from it;
* biprecision: grad_input and grad_weight get independent quantizations of grad_output;
* reproducibility under ``torch.manual_seed``; the no-grad / eval path quantizes the forward;
* coverage through ``explain``; bad options give clear errors.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import fqt_compiler as fqt
from fqt_compiler.sites import GemmStatus, SkipKind
from fqt_compiler.specs import GemmKind, TensorRole

from tests.helpers.models import CNN, MLP, GPTBlock, SDPABlock, SharedInputLinears, make_case, param_grads

MODEL_NAMES = ["mlp", "cnn", "gpt"]


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers
# Reference mode (eager, simulated quantization) compiles in about a second; the default
# kernels mode hands the graphs to Inductor, which takes tens of seconds on CPU.
REF = {"execution": "reference"}


def compile_fqt(model: torch.nn.Module, recipe: str, **options):
    return torch.compile(model, backend="fqt", options={"recipe": recipe, **REF, **options})


def explain(model: torch.nn.Module, *inputs: torch.Tensor, **options) -> fqt.ExplainReport:
    return fqt.explain(model, *inputs, **{**REF, **options})


def step(case, fn, seed: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward of ``case`` through ``fn``; returns (loss, parameter grads)."""
    case.model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = case.loss(fn)
    loss.backward()
    return loss.detach().clone(), param_grads(case.model)


def assert_grads_close(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


def find_fqt_error(exc: BaseException) -> BaseException | None:
    """The fqt exception a torch.compile error wraps (``__cause__`` / ``inner_exception``)."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, fqt.FQTError):
            return cur
        cur = getattr(cur, "inner_exception", None) or cur.__cause__ or cur.__context__
    return None


# --------------------------------------------------------------------------- hand-written QAT
QAT = fqt.recipe("qat")
ACT = QAT.output.activation  # 8-bit per-tensor asymmetric min-max
WGT = QAT.output.weight  # 8-bit per-tensor zero-on-grid


def ste(x: torch.Tensor, spec: fqt.QuantSpec) -> torch.Tensor:
    """Fake-quantize ``x`` in the forward, identity in the backward (straight-through)."""
    return x + (fqt.quantize(x.detach(), spec) - x).detach()


def qlinear(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    # the paper's recipes leave the bias in full precision (fqt quantizes GEMM operands only)
    return F.linear(ste(x, ACT), ste(lin.weight, WGT), lin.bias)


def qconv(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return F.conv2d(ste(x, ACT), ste(conv.weight, WGT), conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def qat_mlp(m: MLP, x: torch.Tensor) -> torch.Tensor:
    return qlinear(F.relu(qlinear(F.relu(qlinear(x, m.fc1)), m.fc2)), m.fc3)


def qat_cnn(m: CNN, x: torch.Tensor) -> torch.Tensor:
    # BatchNorm, ReLU, the residual add and the pooling run in full precision (docs/quantizers.md §2.1)
    h = F.relu(m.bn1(qconv(x, m.conv1)))
    r = F.relu(m.bn2(qconv(h, m.gconv)))
    r = m.bn3(qconv(qconv(r, m.dwconv), m.pwconv))
    h = F.relu(h + r)
    return qlinear(h.mean(dim=(2, 3)), m.head)


def qat_gpt(m: GPTBlock, idx: torch.Tensor) -> torch.Tensor:
    B, T = idx.shape
    x = m.wte(idx) + m.wpe(torch.arange(T))  # embedding lookups are not GEMMs: unquantized

    def attention(h: torch.Tensor) -> torch.Tensor:
        C = h.shape[-1]
        hd = C // m.n_head
        q, k, v = qlinear(h, m.qkv).split(C, dim=2)
        q, k, v = (t.view(B, T, m.n_head, hd).transpose(1, 2) for t in (q, k, v))
        # activation x activation matmuls: both operands quantized with the activation spec
        att = torch.matmul(ste(q, ACT), ste(k.transpose(-2, -1), ACT)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(~m.mask[:T, :T], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = torch.matmul(ste(att, ACT), ste(v, ACT))
        return qlinear(y.transpose(1, 2).contiguous().view(B, T, C), m.proj)

    x = x + attention(m.ln1(x))
    x = x + qlinear(F.gelu(qlinear(m.ln2(x), m.fc)), m.fc2)
    h = m.ln_f(x)
    # lm-head tied to the token embedding: the shared weight is quantized as a weight here
    return F.linear(ste(h, ACT), ste(m.lm_head.weight, WGT))


QAT_REFERENCES = {"mlp": qat_mlp, "cnn": qat_cnn, "gpt": qat_gpt}


# --------------------------------------------------------------------------- exact and qat
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_exact_recipe_matches_eager_autograd(name):
    case = make_case(name)
    loss_eager, grads_eager = step(case, case.model)
    loss_fqt, grads_fqt = step(case, compile_fqt(case.model, "exact"))
    torch.testing.assert_close(loss_fqt, loss_eager, rtol=1e-6, atol=1e-7)
    assert_grads_close(grads_fqt, grads_eager, rtol=1e-5, atol=1e-6)
    # the compile really went through fqt, and every GEMM was left alone by the recipe
    record = fqt.last_compiles()[-1]
    assert record.kind == "joint"
    gemms = [g for s in record.decisions for g in s.gemms]
    assert len(gemms) == case.n_gemms
    assert all(g.status is GemmStatus.SKIPPED and g.skip_kind is SkipKind.BY_RECIPE for g in gemms)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_qat_recipe_matches_hand_written_ste_model(name):
    case = make_case(name)
    reference = QAT_REFERENCES[name]
    loss_ref, grads_ref = step(case, lambda *inputs: reference(case.model, *inputs))
    loss_exact, grads_exact = step(case, case.model)
    loss_qat, grads_qat = step(case, compile_fqt(case.model, "qat"))
    torch.testing.assert_close(loss_qat, loss_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads_qat, grads_ref, rtol=1e-4, atol=1e-6)
    # the references are not trivially equal: 8-bit forward quantization moves the loss
    assert not torch.equal(loss_ref, loss_exact)


@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8)], ids=["2d-input", "3d-input"])
def test_qat_linears_sharing_one_input(shape):
    """Two Linears reading the same activation (q/k projections): compiles, and matches the
    hand-written reference, including the gradient reaching the shared input."""
    torch.manual_seed(0)
    model = SharedInputLinears()
    x = torch.randn(*shape, requires_grad=True)
    target = torch.randn(*shape)

    def run(fn):
        model.zero_grad(set_to_none=True)
        x.grad = None
        loss = F.mse_loss(fn(x), target)
        loss.backward()
        return loss.detach(), {**param_grads(model), "x": x.grad.clone()}

    loss_ref, grads_ref = run(lambda t: qlinear(t, model.q) * torch.tanh(qlinear(t, model.k)))
    loss_qat, grads_qat = run(compile_fqt(model, "qat"))
    torch.testing.assert_close(loss_qat, loss_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads_qat, grads_ref, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- Theorem 1
N_SAMPLES = 300
Z_BOUND = 5.0


THEOREM1_CASES = [(name, recipe, "reference") for name in ("mlp", "cnn") for recipe in ("ptq4", "psq4", "bhq4")]
# through the real low-bit kernels: every conv GEMM of the CNN under ptq4 runs on int8 convolutions
# (zero-point corrections included), and bhq4's dgrad on them with T^-1 after
THEOREM1_CASES += [("cnn", "ptq4", "kernels"), ("cnn", "bhq4", "kernels")]


@pytest.mark.parametrize(("name", "recipe", "execution"), THEOREM1_CASES)
def test_theorem1_mean_fqt_gradient_is_the_qat_gradient(name, recipe, execution):
    case = make_case(name)  # the CNN stays in train mode: BatchNorm uses batch statistics
    _, qat = step(case, compile_fqt(case.model, "qat"))
    options = {"execution": "kernels", "inductor": False} if execution == "kernels" else {}
    fqt_model = compile_fqt(case.model, recipe, **options)
    samples: dict[str, list[torch.Tensor]] = {k: [] for k in qat}
    for i in range(N_SAMPLES):
        _, grads = step(case, fqt_model, seed=1000 + i)
        for k, g in grads.items():
            samples[k].append(g.double())

    # fp32 round-off floor: the bias of a conv followed by BatchNorm has a gradient that is
    # mathematically zero, so QAT's and FQT's values are both pure round-off (~1e-8)
    scale = max(g.abs().max().item() for g in qat.values())
    for k, want in qat.items():
        stack = torch.stack(samples[k])
        mean = stack.mean(0)
        se2 = stack.var(0, unbiased=True) / N_SAMPLES
        diff = (mean - want.double()).norm().item()
        expected = se2.sum().sqrt().item()
        floor = 1e-5 * scale * math.sqrt(want.numel())
        # unbiased: |mean - qat| is within ~5 standard errors of the mean (per tensor, in norm:
        # E|mean - qat|^2 = sum of the per-element squared standard errors)
        assert diff <= Z_BOUND * expected + floor, (
            f"{recipe} {name}: {k}: |mean FQT grad - QAT grad| = {diff:.3g} but the standard error of the "
            f"mean is only {expected:.3g} ({N_SAMPLES} samples): the FQT gradient looks biased"
        )
        # ... and that bound has power: a 25% bias on the same statistic would be flagged
        if want.numel() > 1 and "weight" in k:
            biased = (mean - 1.25 * want.double()).norm().item()
            assert biased > Z_BOUND * expected + floor, (
                f"{k}: the test cannot tell a 25% bias from noise ({biased:.3g} vs {expected:.3g})"
            )

    # single FQT gradients really are noisy: otherwise the statistics above test nothing
    first = {k: v[0].float() for k, v in samples.items()}
    weight_names = [k for k in qat if "weight" in k and qat[k].dim() >= 2]
    for k in weight_names:
        assert not torch.allclose(first[k], qat[k], rtol=1e-3, atol=1e-6), f"{recipe}: a single FQT grad of {k} equals QAT's"
        assert samples[k][0].ne(samples[k][1]).any(), f"{recipe}: two seeds gave the same grad of {k}"


# --------------------------------------------------------------------------- biprecision
_STOCHASTIC_CALL = re.compile(
    r"torch\.ops\.fqt\.(quantize_stochastic|fake_quantize|bhq_quantize)\.default\((\w+), '([^']+)', (\d)\)"
)


def _stochastic_quantizations(text: str) -> list[tuple[str, str, int]]:
    """(input node, spec key, layout) of every stochastic quantization call in a graph's text."""
    out = []
    for m in _STOCHASTIC_CALL.finditer(text):
        if fqt.QuantSpec.from_key(m.group(3)).is_stochastic:
            out.append((m.group(2), m.group(3), int(m.group(4))))
    return out


@pytest.mark.parametrize("recipe", ["psq4", "bhq4", "ptq4"])
def test_biprecision_one_grad_output_quantization_per_backward_gemm(recipe):
    case = make_case("mlp")
    be = fqt.backend(recipe=recipe, debug=True, **REF)
    step(case, torch.compile(case.model, backend=be))
    (record,) = be.records
    assert record.kind == "joint"
    texts = dict(record.graph_texts)
    assert _stochastic_quantizations(texts["input"]) == []
    calls = _stochastic_quantizations(texts["dedupe"])
    # fc1 (input needs no grad): grad_weight only; fc2, fc3: grad_input and grad_weight
    assert len(calls) == 1 + 2 + 2, calls
    spec = fqt.recipe(recipe)
    gi_key, gw_key = spec.grad_input.grad_output.key(), spec.grad_weight.grad_output.key()
    # grad_input quantizes grad_output as consumed (rows = samples); grad_weight quantizes its
    # transpose (layout LAST): two draws per Linear with grad_input, never one shared draw
    assert sorted((k, layout) for _, k, layout in calls) == sorted([(gi_key, 1)] * 2 + [(gw_key, 2)] * 3), calls
    # the decisions agree: every backward GEMM has its own stochastic grad_output spec
    n_backward = 0
    for site in record.decisions:
        for g in site.gemms:
            if g.kind is GemmKind.OUTPUT:
                continue
            n_backward += 1
            (grad,) = [o for o in g.operands if o.role is TensorRole.GRAD_OUTPUT]
            want = spec.grad_input.grad_output if g.kind is GemmKind.GRAD_INPUT else spec.grad_weight.grad_output
            assert grad.spec == want and grad.spec.is_stochastic
    assert n_backward == len(calls)


class _SquareLinear(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_biprecision_grad_input_and_grad_weight_see_independent_draws():
    """Recover the two quantized grad_outputs from the gradients and compare them.

    With y = x Wᵀ and loss = sum(y * G): grad_x = Q_a(G) Ŵ and grad_W = Q_w(G)ᵀ X̂, so
    Q_a(G) = grad_x Ŵ⁻¹ and Q_w(G) = (grad_W X̂⁻¹)ᵀ. Under ``ptq4`` both use the same per-tensor
    grid, so one shared draw would make them equal; independent draws differ, and each lies on
    the grid next to G.
    """
    d = 6
    torch.manual_seed(0)
    model = _SquareLinear(d)
    x = (torch.randn(d, d) + 2 * torch.eye(d)).requires_grad_(True)
    G = torch.randn(d, d)
    spec = fqt.recipe("ptq4")
    cm = compile_fqt(model, "ptq4")
    torch.manual_seed(123)
    (cm(x) * G).sum().backward()
    w_hat = fqt.quantize(model.lin.weight.detach(), spec.output.weight).double()
    x_hat = fqt.quantize(x.detach(), spec.output.activation).double()
    q_a = x.grad.double() @ torch.linalg.inv(w_hat)
    q_w = (model.lin.weight.grad.double() @ torch.linalg.inv(x_hat)).t()

    # the grid of the per-tensor zero-on-grid 4-bit quantizer of G (PTQ): values k * step
    gq = spec.grad_input.grad_output
    lo, hi = min(G.min().item(), 0.0), max(G.max().item(), 0.0)
    qzero = max(1, min(gq.levels, math.floor(-lo * gq.levels / (hi - lo))))
    step_ = max(-lo / qzero, hi / (gq.levels - qzero))
    for name, q in (("grad_input", q_a), ("grad_weight", q_w)):
        k = q / step_
        assert (k - k.round()).abs().max() < 1e-3, f"{name}: recovered grad_output is not on the {gq.short()} grid"
        # stochastic rounding picks one of the two grid neighbours of G
        assert ((q - G.double()).abs() <= step_ * (1 + 1e-3)).all(), name
    assert not torch.allclose(q_a, G.double(), atol=1e-4), "grad_output was not quantized"
    n_diff = int(((q_a - q_w).abs() > step_ / 2).sum())
    assert n_diff > 0, "grad_input and grad_weight used the same quantization of grad_output"


# --------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("recipe", ["psq4", "bhq4"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_same_seed_same_gradients_other_seed_other_gradients(name, recipe):
    case = make_case(name)
    cm = compile_fqt(case.model, recipe)
    loss_a, a = step(case, cm, seed=7)
    loss_b, b = step(case, cm, seed=7)
    _, c = step(case, cm, seed=8)
    assert torch.equal(loss_a, loss_b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: same seed, different gradient"
    assert any(not torch.equal(a[k], c[k]) for k in a if "weight" in k), "different seeds gave identical gradients"


# --------------------------------------------------------------------------- inference path
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_grad_inference_quantizes_the_forward(name):
    case = make_case(name)
    case.model.eval()  # BatchNorm uses running statistics
    be = fqt.backend(recipe="psq4", **REF)
    cm = torch.compile(case.model, backend=be)
    with torch.no_grad():
        exact = case.model(*case.inputs)
        ref = QAT_REFERENCES[name](case.model, *case.inputs)
        got = cm(*case.inputs)
    assert [r.kind for r in be.records] == ["inference"]
    gemms = [g for s in be.records[0].decisions for g in s.gemms]
    assert [g.kind for g in gemms] == [GemmKind.OUTPUT] * len(be.records[0].decisions)
    assert all(g.status is GemmStatus.SIMULATED for g in gemms)
    assert not torch.equal(got, exact), "the inference path did not quantize"
    torch.testing.assert_close(got, exact, rtol=0.1, atol=0.05 * exact.abs().max().item())
    # and it is exactly the quantized forward of QAT / FQT (deterministic rounding)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_explain_quantizes_every_gemm(name):
    case = make_case(name)
    report = explain(case.model, *case.inputs, recipe="psq4")
    counts = report.counts()
    assert counts["simulated"] == case.n_gemms, str(report)
    assert counts["skipped"] == 0, str(report)
    assert sum(counts.values()) == case.n_gemms
    for site, gemm in report.rows():
        assert gemm.status is GemmStatus.SIMULATED
        for o in gemm.operands:
            assert o.spec is not None, f"{site.module_path} {gemm.kind.value}: {o.role.value} left in high precision"
    # every forward GEMM has its backward GEMMs (3), except the first layer whose input needs no grad (2)
    per_site = sorted(len(s.gemms) for s in report.sites)
    assert per_site.count(2) == (0 if name == "gpt" else 1), str(report)
    assert set(per_site) <= {2, 3}
    assert str(report).startswith(f"fqt explain (recipe psq4): {len(report.sites)} GEMM sites")


def test_explain_cnn_covers_grouped_depthwise_and_pointwise_convs():
    case = make_case("cnn")
    report = explain(case.model, *case.inputs, recipe="psq4")
    by_module = {s.module_path: s for s in report.sites}
    assert set(by_module) == {"conv1", "gconv", "dwconv", "pwconv", "head"}, str(report)
    assert [g.kind for g in by_module["conv1"].gemms] == [GemmKind.OUTPUT, GemmKind.GRAD_WEIGHT]
    for mod in ("gconv", "dwconv", "pwconv", "head"):
        kinds = {g.kind for g in by_module[mod].gemms}
        assert kinds == {GemmKind.OUTPUT, GemmKind.GRAD_INPUT, GemmKind.GRAD_WEIGHT}, (mod, kinds)
    # the model state is restored by explain
    fresh = make_case("cnn")
    for (k, v), (_, w) in zip(case.model.state_dict().items(), fresh.model.state_dict().items()):
        assert torch.equal(v, w), k


def test_explain_gpt_tied_lm_head_is_a_weight():
    case = make_case("gpt")
    report = explain(case.model, *case.inputs, recipe="psq4")
    (head,) = [s for s in report.sites if s.module_path == "lm_head"]
    out = next(g for g in head.gemms if g.kind is GemmKind.OUTPUT)
    assert [o.role for o in out.operands] == [TensorRole.ACTIVATION, TensorRole.WEIGHT]
    assert out.operands[1].spec == fqt.recipe("psq4").output.weight
    assert {g.kind for g in head.gemms} == {GemmKind.OUTPUT, GemmKind.GRAD_INPUT, GemmKind.GRAD_WEIGHT}
    # the attention matmuls are activation x activation with grad_lhs / grad_rhs
    bmm_sites = [s for s in report.sites if s.op == "aten.bmm"]
    assert len(bmm_sites) == 2, str(report)
    for s in bmm_sites:
        assert {g.kind for g in s.gemms} == {GemmKind.OUTPUT, GemmKind.GRAD_LHS, GemmKind.GRAD_RHS}
        out = next(g for g in s.gemms if g.kind is GemmKind.OUTPUT)
        assert [o.role for o in out.operands] == [TensorRole.ACTIVATION, TensorRole.ACTIVATION]
    linears = {s.module_path for s in report.sites if s.op != "aten.bmm"}
    assert linears == {"qkv", "proj", "fc", "fc2", "lm_head"}, str(report)


def _sdpa_case():
    torch.manual_seed(0)
    model = SDPABlock()
    x = torch.randn(2, 5, 8, requires_grad=True)
    return model, x


def test_explain_fused_attention_is_skipped_with_reason():
    model, x = _sdpa_case()
    report = explain(model, x, recipe="psq4")
    counts = report.counts()
    assert counts["simulated"] == SDPABlock.n_linear_gemms, str(report)
    assert counts["skipped"] == 2, str(report)  # the attention op and its backward, each listed
    skipped = [(s, g) for s, g in report.rows() if g.status is GemmStatus.SKIPPED]
    for site, gemm in skipped:
        assert "scaled_dot_product" in site.op and gemm.flops > 0
        assert "fused attention" in gemm.reason
        assert gemm.skip_kind is SkipKind.UNSUPPORTED
    assert "(backward)" in skipped[1][1].reason
    assert "fused attention" in str(report)
    quantized = {s.module_path for s, g in report.rows() if g.status is GemmStatus.SIMULATED}
    assert quantized == {"q", "k", "v", "out"}


def test_strict_mode_raises_on_fused_attention():
    model, x = _sdpa_case()
    with pytest.raises(Exception) as info:
        explain(model, x, recipe="psq4", strict=True)
    err = find_fqt_error(info.value)
    assert isinstance(err, fqt.UnsupportedGraphError), repr(info.value)
    assert "fused attention" in str(err) and "strict=False" in str(err)
    # the same through torch.compile with a configured backend
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(model, backend=fqt.backend(recipe="psq4", strict=True, **REF))(x)
    assert isinstance(find_fqt_error(info.value), fqt.UnsupportedGraphError)
    # strict mode is fine with a model it can fully quantize
    torch._dynamo.reset()
    case = make_case("mlp")
    step(case, torch.compile(case.model, backend=fqt.backend(recipe="psq4", strict=True, **REF)))


# --------------------------------------------------------------------------- bad input
def _compile_error(options: dict) -> tuple[BaseException, BaseException | None]:
    case = make_case("mlp")
    with pytest.raises(Exception) as info:
        torch.compile(case.model, backend="fqt", options=options)(*case.inputs)
    return info.value, find_fqt_error(info.value)


def test_unknown_recipe_through_options_lists_valid_recipes():
    outer, err = _compile_error({"recipe": "nope"})
    assert isinstance(outer, torch._dynamo.exc.BackendCompilerFailed)
    assert isinstance(err, ValueError) and isinstance(err, fqt.SpecError)
    msg = str(err)
    assert "'nope'" in msg
    for name in ("exact", "qat", "psq4", "bhq8", "int8"):
        assert name in msg
    assert "nope" in str(outer)


def test_unknown_option_key_is_named():
    outer, err = _compile_error({"recipe": "psq8", "bogus_option": 1})
    assert isinstance(err, fqt.OptionsError) and isinstance(err, ValueError)
    assert "bogus_option" in str(err)
    assert "recipe" in str(err)  # lists the valid keys
    assert "bogus_option" in str(outer)


def test_backend_factory_rejects_bad_values_directly():
    with pytest.raises(fqt.OptionsError, match=r"mode='nope'.*reference"):
        fqt.backend(mode="nope")
    with pytest.raises(fqt.OptionsError, match="strict"):
        fqt.backend(recipe="psq8", strict="yes")
    with pytest.raises(fqt.OptionsError, match="colour"):
        fqt.backend(recipe="psq8", colour="red")
    with pytest.raises(fqt.SpecError, match=r"Did you mean 'psq8'"):
        fqt.backend(recipe="psq9")
    with pytest.raises(ValueError):
        fqt.backend(recipe="nope")
