"""Prologue fusion through the backend: ``fusion="triton"`` (generated kernels, run by Triton's
interpreter on CPU) against ``fusion="off"`` (every quantizer a standalone kernel) on the same
graphs. Deterministic recipes must agree bit for bit where the fused chains are exactly rounded
ops, and to the last ulp of the transcendental ones; the decision record lists every fusion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.codegen import FusedEpilogue, FusedQuantize
from fqt_compiler.config import Fusion

from tests.helpers.models import make_case, param_grads

pytestmark = pytest.mark.usefixtures("one_thread")


class ResidualMLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, residual add, ReLU * 2 + skip -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc, self.proj, self.head = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = x + self.proj(F.gelu(self.fc(self.ln(x))))
        return self.head(torch.relu(h) * 2.0 + x)


def _run(model_fn, inputs, loss_fn, recipe, fusion):
    torch._dynamo.reset()
    model = model_fn()
    be = fqt.backend(recipe=recipe, inductor=False, fusion=fusion)
    torch.manual_seed(1)
    out = torch.compile(model, backend=be)(*inputs)
    loss = loss_fn(out)
    loss.backward()
    return loss.detach(), param_grads(model), be


def _residual_mlp():
    torch.manual_seed(0)
    return ResidualMLP()


@pytest.mark.interpreter
@pytest.mark.parametrize("recipe", ["qat", "ptq8", "int8"])
def test_fused_and_unfused_paths_agree(recipe):
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(3))
    loss_fn = lambda y: y.square().mean()  # noqa: E731
    l0, g0, _ = _run(_residual_mlp, (x,), loss_fn, recipe, "off")
    l1, g1, be = _run(_residual_mlp, (x,), loss_fn, recipe, "triton")
    fused = [f for r in be.records for f in r.fused]
    ops = {op for f in fused for op in f.ops}
    assert {"aten.gelu.default", "aten.add.Tensor", "aten.mul.Tensor"} <= ops, ops
    if recipe != "qat":  # quantized gradients: the backward chains fuse too
        assert {"aten.gelu_backward.default", "aten.threshold_backward.default"} <= ops, ops
    # the forward: GELU, adds and muls, the same codes; GELU's erf rounds its last ulp as this
    # CPU's vector math does (numpy's under the interpreter), and a per-row scale of its output
    # (int8) carries that ulp into the loss
    torch.testing.assert_close(l1, l0, rtol=2e-7, atol=0)
    for name in g0:
        # the backward's GELU derivative is a transcendental chain: last-ulp agreement
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.interpreter
def test_the_high_precision_value_other_consumers_read_is_written_by_the_same_kernel():
    """MLP: ReLU's output feeds the next quantizer and is saved for ReLU's backward; the
    gradient after threshold_backward feeds a quantizer and the bias gradient's sum. Those
    kernels write the value too; GELU's output in the residual MLP feeds the quantizer only."""
    case = make_case("mlp")
    _, _, be = _run(lambda: make_case("mlp").model, case.inputs, case.loss_fn, "ptq8", "triton")
    fused = [(f.ops, f.writes_hp) for r in be.records for f in r.fused if isinstance(f, FusedQuantize)]
    assert (("aten.relu.default",), True) in fused and (("aten.threshold_backward.default",), True) in fused, fused
    # the ReLU quantizer reads a GEMM's output: its statistics come from that GEMM's epilogue,
    # and it writes the saved value in its codes pass
    relu_q = next(f.node for r in be.records for f in r.fused if isinstance(f, FusedQuantize) and f.ops == ("aten.relu.default",))
    assert any(isinstance(f, FusedEpilogue) and f.ops == (f"statistics of {relu_q}",) for r in be.records for f in r.fused)
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(3))
    _, _, be = _run(_residual_mlp, (x,), lambda y: y.sum(), "ptq8", "triton")
    by_ops = {f.ops: f.writes_hp for r in be.records for f in r.fused if isinstance(f, FusedQuantize)}
    assert by_ops[("aten.gelu.default",)] is False


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_internal_models_agree_fused_and_unfused(name):
    def model_fn():
        return make_case(name).model

    case = make_case(name)
    l0, g0, _ = _run(model_fn, case.inputs, case.loss_fn, "ptq8", "off")
    l1, g1, be = _run(model_fn, case.inputs, case.loss_fn, "ptq8", "triton")
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for n in g0:  # last-ulp differences of the transcendental chains, at the gradient's scale
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6 * float(g0[n].abs().max()), msg=n)


class ResidualHead(nn.Module):
    """relu(x + proj(relu(fc(x))) * 0.5): the second GEMM's consumers are exactly rounded ops."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.proj = nn.Linear(32, 48), nn.Linear(48, 32)

    def forward(self, x):
        return torch.relu(x + self.proj(torch.relu(self.fc(x))) * 0.5)


@pytest.mark.interpreter
@pytest.mark.parametrize("recipe", ["int8", "ptq8"])
def test_gemm_epilogues_absorb_their_consumers_bit_exactly(recipe):
    def model_fn():
        torch.manual_seed(0)
        return ResidualHead()

    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(3))
    l0, g0, _ = _run(model_fn, (x,), lambda y: y.square().mean(), recipe, "off")
    l1, g1, be = _run(model_fn, (x,), lambda y: y.square().mean(), recipe, "triton")
    epilogues = [f.ops for r in be.records for f in r.fused if isinstance(f, FusedEpilogue)]
    assert ("aten.mul.Tensor", "aten.add.Tensor", "aten.relu.default") in epilogues, epilogues
    assert torch.equal(l0, l1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-8, msg=name)


def test_fusion_option_is_validated_and_triton_needs_a_device():
    with pytest.raises(fqt.OptionsError, match="fusion='sometimes' is not valid"):
        fqt.backend(fusion="sometimes")
    assert fqt.backend(fusion="OFF").config.fusion is Fusion.OFF


@pytest.mark.interpreter
def test_generated_kernel_sources_are_in_the_record():
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(3))
    _, _, be = _run(_residual_mlp, (x,), lambda y: y.sum(), "int8", "triton")
    sources = {k: v for r in be.records for k, v in r.kernel_sources.items() if k.startswith("fused:")}
    assert sources and all("Generated by fqt" in v for v in sources.values())
    kinds = {"rows_kernel" if "def rows_kernel" in v else "qmm_epilogue_kernel" for v in sources.values()}
    assert kinds == {"rows_kernel", "qmm_epilogue_kernel"}, kinds


T = None
try:  # the coverage models, when the optional transformers package is there
    import transformers as T  # noqa: N812
except ImportError:
    pass


@pytest.mark.slow  # five Hugging Face models, each fused and unfused
@pytest.mark.interpreter
@pytest.mark.skipif(T is None, reason="needs the optional transformers package")
@pytest.mark.parametrize("name", ["gpt2", "llama", "resnet", "bert", "vit"])
def test_coverage_models_agree_fused_and_unfused(name):
    """The Hugging Face coverage models under a deterministic recipe (ptq8 with nearest
    gradient rounding): the generated kernels reproduce the unfused run bit for bit, except
    where a fused chain holds erf (BERT's and ViT's GELU), which agrees to the last ulp, and so
    the loss and gradients to round-off.

    (Stochastic recipes agree in distribution only: a fused quantizer draws its seed where its
    kernel runs, so seeds are assigned in another order than unfused.)"""
    import tests.test_transformers_models as hf
    from tests.helpers.recipes import nearest_gradients

    factory = getattr(hf, name)

    def model_fn():
        torch.manual_seed(0)
        return factory()[0]

    _, inputs, loss_fn = factory()
    recipe = nearest_gradients("ptq8")
    l0, g0, _ = _run(model_fn, inputs, loss_fn, recipe, "off")
    l1, g1, be = _run(model_fn, inputs, loss_fn, recipe, "triton")
    assert [f for r in be.records for f in r.fused], "no fused kernel"  # the ResNet's: its convolutions' quantizers
    erf = name in ("bert", "vit")
    # a last-ulp difference in a GELU can move a later quantizer's input across a rounding
    # boundary: then a code differs by one step, and so does the loss, by round-off
    assert torch.equal(l0, l1) or erf and torch.allclose(l1, l0, rtol=1e-5, atol=0), (l0.item(), l1.item())
    for n in g0:
        if erf:
            torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=1e-5 * float(g0[n].abs().max()) + 1e-12, msg=n)
        else:
            assert torch.equal(g1[n], g0[n]), n


def test_standalone_cpu_quantizer_survives_many_shapes():
    """Regression: the ``fusion="off"`` CPU baseline compiled one function for every shape and
    hit Dynamo's recompile limit (a hard error under fullgraph) at the ninth shape."""
    from fqt_compiler.standalone import standalone_cpu
    from fqt_compiler.layout import Layout
    from fqt_compiler.reference import quantize_ref
    from fqt_compiler.specs import QuantSpec

    spec = QuantSpec(granularity="row")
    with torch._dynamo.config.patch(recompile_limit=2):  # a low limit: few (slow) compiles show it
        for rows in range(1, 5):
            x = torch.randn(rows, 8, generator=torch.Generator().manual_seed(rows))
            got = standalone_cpu(spec, Layout.PENULTIMATE, example=x)(x)
            want = quantize_ref(x, spec, Layout.PENULTIMATE)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _operand_strides(monkeypatch) -> list:
    """Record the strides of every low-bit GEMM's operands as the GEMMs run."""
    import fqt_compiler.codegen.kernels.qmm_fused as qe
    import fqt_compiler.ops as ops

    seen = []
    plain, epi = ops.qmm_cpu, qe.qmm_fused

    def qmm_cpu(a, b, *rest):
        seen.append((tuple(a.codes.shape), a.codes.stride(), tuple(b.codes.shape), b.codes.stride()))
        return plain(a, b, *rest)

    def qmm_fused(a, b, *rest):
        seen.append((tuple(a.codes.shape), a.codes.stride(), tuple(b.codes.shape), b.codes.stride()))
        return epi(a, b, *rest)

    monkeypatch.setattr(ops, "qmm_cpu", qmm_cpu)
    monkeypatch.setattr(qe, "qmm_fused", qmm_fused)
    return seen


def _k_major(shape_a, stride_a, shape_b, stride_b) -> bool:
    return (shape_a[1] == 1 or stride_a[1] == 1) and (shape_b[0] == 1 or stride_b[0] == 1)


@pytest.mark.interpreter
@pytest.mark.parametrize("recipe", ["int8", "ptq8"])
def test_every_low_bit_gemm_reads_k_major_codes(recipe, monkeypatch):
    """Quantizers write codes in the memory order their GEMMs read K-major (column-major, or
    both orders when a reader needs the natural one), and codes saved for the backward in the
    order the backward's GEMM reads: every operand of every GEMM, forward and backward. Standalone
    quantizers (``off``) leave at least the forward weights' and the backward's requantized
    operands N-major."""
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(3))
    seen = _operand_strides(monkeypatch)
    _, _, be_off = _run(_residual_mlp, (x,), lambda y: y.square().mean(), recipe, "off")
    assert seen and sum(not _k_major(*s) for s in seen) >= 3, seen
    seen.clear()
    l1, g1, be = _run(_residual_mlp, (x,), lambda y: y.square().mean(), recipe, "triton")
    not_k = [s for s in seen if not _k_major(*s)]
    assert len(seen) >= 8 and not not_k, not_k
    choices = {c.layout.name for r in be.records for c in r.layouts}
    # weights saved for the backward: both orders; int8 requantizes in the backward, column-major;
    # ptq reuses the forward's activation codes as B of the weight gradient: saved column-major
    # next to the natural codes the forward GEMM reads, both from one kernel
    assert choices == ({"COLUMN_MAJOR", "BOTH"} if recipe == "int8" else {"BOTH"}), choices
    saved = [c for r in be.records for c in r.layouts if "output" in c.readers]
    assert len(saved) == (0 if recipe == "int8" else 3), saved


def _two_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))


@pytest.mark.interpreter
@pytest.mark.parametrize("recipe", ["int8", "ptq8"])
@pytest.mark.parametrize("model_fn", [_residual_mlp, _two_layers], ids=["residual-mlp", "two-layers"])
def test_next_quantizers_statistics_come_from_the_gemm_epilogue(recipe, model_fn):
    """The first GEMM gathers the statistics of GELU(its output) for the quantizer feeding the
    second (per-row for int8, per-tensor for ptq8): that quantizer reads its input once. Chains
    with other leaves fold too (the epilogue loads them at the tile): relu(h) * 2 + x in the
    forward, GELU's and ReLU's derivatives (reading saved activations) in the backward. In the
    two-layer model's backward, the GEMM whose epilogue computes GELU's derivative gathers the
    statistics of the transposed gradient quantizer of the first weight gradient: per column
    (int8), per tensor (ptq8). Same loss and gradients as the unfused run."""
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(3))
    loss_fn = lambda y: y.square().mean()  # noqa: E731
    l0, g0, _ = _run(model_fn, (x,), loss_fn, recipe, "off")
    l1, g1, be = _run(model_fn, (x,), loss_fn, recipe, "triton")
    folds = [f for r in be.records for f in r.fused if isinstance(f, FusedEpilogue) and f.ops[0].startswith("statistics of")]
    wanted = 2 if model_fn is _two_layers else 4
    assert len(folds) == wanted, [f.ops for r in be.records for f in r.fused]
    if model_fn is _residual_mlp:  # chains with another leaf: GELU's derivative reads the saved pre-activation
        chains = {(f.stage, f.node): f.ops for r in be.records for f in r.fused if isinstance(f, FusedQuantize)}
        folded = {chains.get((f.stage, f.ops[0].split()[-1])) for f in folds}
        assert {("aten.gelu_backward.default",), ("aten.mul.Tensor", "aten.threshold_backward.default")} <= folded, folded
    sources = [v for r in be.records for k, v in r.kernel_sources.items() if "statistics of the quantizer" in v]
    assert len(sources) == wanted and all("update_row_stats" in v for v in sources)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)  # GELU's erf: last-ulp, with or without the fold
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.interpreter
def test_codes_saved_column_major_cross_into_an_inductor_compiled_backward():
    """The forward saves the activation codes column-major; the backward graph, compiled by
    Inductor (which checks its inputs' strides), takes them with those strides. Deterministic
    ptq8: fc's weight gradient (a low-bit GEMM on saved column-major codes of exactly
    computed values) equals the unfused eager run bit for bit; the rest agree to float rounding
    (GELU's erf in the fused kernels, LayerNorm reduced by Inductor in its own order)."""
    from tests.helpers.recipes import nearest_gradients

    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(3))
    recipe = nearest_gradients("ptq8")
    grads = []
    for fusion, inductor in (("off", False), ("triton", True)):
        torch._dynamo.reset()
        model = _residual_mlp()
        be = fqt.backend(recipe=recipe, inductor=inductor, fusion=fusion)
        torch.compile(model, backend=be)(x).square().mean().backward()
        grads.append(param_grads(model))
    assert [c for r in be.records for c in r.layouts if "output" in c.readers], "no codes saved column-major"
    for name in grads[0]:
        if name == "fc.weight":
            assert torch.equal(grads[1][name], grads[0][name]), name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-8, msg=name)


def test_standalone_cpu_quantizers_do_not_recompile_after_the_first_step(monkeypatch):
    """Regression: the ``fusion="off"`` CPU quantizers are first run while the step is compiled
    (every dispatch key excluded) and then from the compiled step (ADInplaceOrView not excluded);
    Dynamo's dispatch-key guard failed and every quantizer recompiled on the second step."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU standalone ops, not Triton's
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    compiled = torch.compile(model, backend=fqt.backend(recipe="int8", fusion="off"))
    gen = torch.Generator().manual_seed(0)

    def step():
        compiled(torch.randn(4, 16, generator=gen)).square().sum().backward()

    step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        step()
        step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
