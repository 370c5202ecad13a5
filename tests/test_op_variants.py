"""Every GEMM flavour the pass must find: conv 1-D/3-D, strided, grouped, depthwise, transposed;
``x @ W`` on 3-D inputs, ``W @ x``, einsum, baddbmm — found, paired and quantized."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.specs import GemmKind, TensorRole


class Variants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, stride=2, padding=1)
        self.c3 = nn.Conv3d(2, 4, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.ct = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.W = nn.Parameter(torch.randn(8, 5) / 3)
        self.L = nn.Parameter(torch.randn(3, 6) / 3)

    def forward(self, a, v, img, x, r):
        out = self.c1(a).sum() + self.c3(v).sum() + self.ct(self.dw(img)).square().mean()
        out = out + (x @ self.W).sum()  # 3-D activation, weight on the right, no transpose
        out = out + (self.L @ r).sum()  # weight on the left; r needs no grad
        out = out + torch.einsum("btk,kn->btn", x, self.W).square().sum()
        out = out + torch.baddbmm(torch.zeros(2, 3, 5), x, self.W.expand(2, 8, 5)).sum()
        return out


def _inputs():
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 9), (2, 2, 3, 4, 4), (2, 4, 5, 5), (2, 3, 8)]
    leaves = [torch.randn(*s, generator=g, requires_grad=True) for s in shapes]
    return (*leaves, torch.randn(6, 2, generator=g))


def test_variants_every_gemm_found_and_quantized():
    model = Variants()
    report = fqt.explain(model, *_inputs(), recipe="bhq5", execution="reference", debug=True)
    counts = report.counts()
    # 4 convs x 3 GEMMs + 3 weight matmuls x 3 + (L @ r): output + grad_weight only
    assert counts == {"lowbit-kernel": 0, "simulated": 4 * 3 + 3 * 3 + 2, "skipped": 0}, str(report)
    kinds = {(s.module_path, g.kind) for s, g in report.rows()}
    assert ("ct", GemmKind.GRAD_INPUT) in kinds and ("dw", GemmKind.GRAD_WEIGHT) in kinds
    # every matmul with a parameter operand sees it as the weight, whichever side it is on
    for site in report.sites:
        if site.op in ("aten.mm", "aten.bmm", "aten.baddbmm"):
            roles = {o.role for o in site.gemms[0].operands}
            assert TensorRole.WEIGHT in roles, site


@pytest.mark.parametrize("recipe", ["int8", "psq4", "bhq4", "fp8"])
def test_variants_train_step_finite(recipe):
    model = Variants()
    ref = Variants()
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend=fqt.backend(recipe=recipe, execution="reference", debug=True))
    inputs = _inputs()
    compiled(*inputs).backward()
    ref_inputs = _inputs()
    ref(*ref_inputs).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # quantized gradients are noisy but must stay close to the exact ones
        rel = (p.grad - q.grad).norm() / q.grad.norm()
        assert rel < 0.5, (name, float(rel))
    for leaf, ref_leaf in zip(inputs[:4], ref_inputs[:4]):
        assert torch.isfinite(leaf.grad).all()
        assert (leaf.grad - ref_leaf.grad).norm() / ref_leaf.grad.norm() < 0.5


def test_exact_recipe_skips_by_recipe_not_unsupported():
    model = Variants()
    report = fqt.explain(model, *_inputs(), recipe="exact", execution="reference", strict=True)
    assert report.counts()["skipped"] == 4 * 3 + 3 * 3 + 2
    assert all("high precision" in g.reason for _, g in report.rows())


def test_sdpa_is_reported_skipped_and_strict_raises():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            # the usual multi-head layout (batch, heads, tokens, head_dim): dispatches to the
            # fused CPU flash-attention kernel, an opaque op the pass must report
            q, k, v = (lin(x).view(2, 4, 2, 4).transpose(1, 2) for lin in (self.q, self.k, self.v))
            return F.scaled_dot_product_attention(q, k, v).sum()

    x = torch.randn(2, 4, 8)
    report = fqt.explain(Attn(), x, recipe="int8", execution="reference")
    skipped = [g for _, g in report.rows() if g.status is fqt.GemmStatus.SKIPPED]
    assert skipped and all("attention" in g.reason for g in skipped)
    assert report.counts()["simulated"] == 3 * 2  # q, k, v: output + grad_weight (x needs no grad)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="fused attention"):
        fqt.explain(Attn(), x, recipe="int8", execution="reference", strict=True)
    # the attention's backward row names the module too (backward nodes carry no module stack)
    report = fqt.explain(_Wrapped(Attn()), x, recipe="int8", execution="reference")
    paths = [s.module_path for s, g in report.rows() if g.status is fqt.GemmStatus.SKIPPED]
    assert len(paths) >= 2 and set(paths) == {"attn"}, paths


def test_the_transformer_inference_fast_path_is_reported_with_its_fix():
    """In eval mode without grad, nn.TransformerEncoderLayer runs PyTorch's fused fast path:
    one opaque op holding every GEMM of the layer. It is reported skipped, naming the switch
    that turns it off; with the fast path off, the layer's Linears are quantized."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    be = fqt.backend(recipe="int8")
    with torch.no_grad():
        out = torch.compile(layer, backend=be)(x)
    torch.testing.assert_close(out, layer(x))  # high precision: nothing silently different
    labels = [g.label for r in be.records for s in r.decisions for g in s.gemms]
    assert labels and all("set_fastpath_enabled(False)" in label for label in labels), labels
    torch._dynamo.reset()
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        be = fqt.backend(recipe="int8")
        with torch.no_grad():
            torch.compile(layer, backend=be)(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    labels = [g.label for r in be.records for s in r.decisions for g in s.gemms]
    assert sum(label.startswith("lowbit") for label in labels) == 4, labels  # in-projection, out-projection, 2 FFN


class _PartsOfParameters(nn.Module):
    """A slice of a (tied or padded) weight matrix and one expert of a stacked tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(12, 8) * 0.3)
        self.experts = nn.Parameter(torch.randn(3, 8, 8) * 0.3)

    def forward(self, x):
        return F.linear(x, self.table[:8]) @ self.experts[1].t()


def test_a_slice_or_an_element_of_a_parameter_is_a_weight():
    """Parts of a parameter reach the GEMM through slice / select: they are weights (weight
    specs; backward GEMMs grad_input / grad_weight on the low-bit kernels), not activations
    (whose per-row scales left the backward GEMMs simulated)."""
    torch.manual_seed(0)
    model, x = _PartsOfParameters(), torch.randn(16, 8)
    model(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    be = fqt.backend(recipe="int8")
    torch.compile(model, backend=be)(x).square().mean().backward()
    gemms = [g for r in be.records for s in r.decisions for g in s.gemms]
    assert sorted(g.kind.value for g in gemms) == sorted(["output", "grad_weight"] * 2 + ["grad_input"])
    assert all(g.status is fqt.GemmStatus.LOWBIT_KERNEL for g in gemms), [g.label for g in gemms]
    outputs = [g for g in gemms if g.kind is GemmKind.OUTPUT]
    assert all(g.operands[1].role is TensorRole.WEIGHT for g in outputs)
    for name, p in model.named_parameters():
        assert ((p.grad - want[name]).norm() / want[name].norm()) < 0.05, name


class _ComputedWeights(nn.Module):
    """Weights users compute from parameters: weight normalization (a parametrization),
    weight standardization, and a frozen base plus a trainable low-rank update (LoRA)."""

    def __init__(self) -> None:
        super().__init__()
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
        self.ws = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.base = nn.Parameter(torch.randn(8, 8) * 0.3, requires_grad=False)
        self.a = nn.Parameter(torch.randn(2, 8) * 0.3)
        self.b = nn.Parameter(torch.randn(8, 2) * 0.3)

    def forward(self, x):
        standardized = (self.ws - self.ws.mean(1, keepdim=True)) / (self.ws.std(1, keepdim=True) + 1e-5)
        h = F.linear(torch.tanh(self.wn(x)), standardized)
        return F.linear(h, self.base + self.b @ self.a)


def test_a_weight_computed_from_parameters_is_a_weight():
    """An operand computed from parameters alone is a weight (per-output-channel specs, the
    backward GEMMs grad_input / grad_weight on the low-bit kernels), whatever ops compute it;
    the low-rank product of two parameters is a weight x weight GEMM."""
    torch.manual_seed(0)
    model, x = _ComputedWeights(), torch.randn(16, 8)
    model(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    be = fqt.backend(recipe="int8", inductor=False)  # the decisions do not depend on Inductor
    torch.compile(model, backend=be)(x).square().mean().backward()
    sites = [s for r in be.records for s in r.decisions]
    linears = [s for s in sites if s.gemms[0].operands[0].role is TensorRole.ACTIVATION]
    assert len(linears) == 3, [s.op for s in sites]
    for s in linears:
        assert s.gemms[0].operands[1].role is TensorRole.WEIGHT, s.op
        assert {g.kind.value for g in s.gemms} >= {"output", "grad_weight"}, s.op
        assert all(g.status is fqt.GemmStatus.LOWBIT_KERNEL for g in s.gemms), [g.label for g in s.gemms]
    lora = [s for s in sites if s not in linears]
    assert len(lora) == 1 and all(o.role is TensorRole.WEIGHT for o in lora[0].gemms[0].operands)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ((p.grad - want[name]).norm() / want[name].norm()) < 0.05, name


class _Wrapped(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x)


def test_variants_kernels_mode_lowers_every_realizable_gemm():
    """Kernels mode: 2-D GEMMs whose scales are constant along K become int8 kernels; the
    rest stays simulated, each with its reason (bhq5: per-tensor forward operands)."""
    report = fqt.explain(Variants(), *_inputs(), recipe="bhq5", execution="kernels", inductor=False)
    by = {(s.site_id, g.kind): g for s, g in report.rows()}
    reasons = {g.reason for g in by.values() if g.status is fqt.GemmStatus.SIMULATED}
    assert all(reasons), "every simulated GEMM states why"
    convs = [g for (sid, _), g in by.items() if report.sites[sid].op == "aten.convolution"]
    assert convs
    for g in convs:  # the paper's per-(channel, position) grad_weight scales vary along wgrad's contraction
        if "transposed" in g.reason:
            assert g.status is fqt.GemmStatus.SIMULATED, g
        elif g.kind is GemmKind.GRAD_WEIGHT:
            assert g.status is fqt.GemmStatus.SIMULATED and "vary along the contraction" in g.reason, g
        else:
            assert g.status is fqt.GemmStatus.LOWBIT_KERNEL, g
            assert g.kind is not GemmKind.GRAD_INPUT or "T^-1" in g.kernel, g
    mms = [(report.sites[sid], g) for (sid, _), g in by.items() if report.sites[sid].op == "aten.mm"]
    assert len(mms) == 5
    for site, g in mms:
        weight_on_left = g.shape == "3x6x2"  # L @ r
        if g.kind is GemmKind.GRAD_INPUT:  # BHQ: int8 GEMM on the codes of T dY, then T^-1
            assert g.status is fqt.GemmStatus.LOWBIT_KERNEL and "T^-1" in g.kernel, (site, g)
        elif g.kind is GemmKind.GRAD_WEIGHT and weight_on_left:
            # dL = dY @ r.T contracts over dY's columns: the paper's per-column scales vary along K
            assert g.status is fqt.GemmStatus.SIMULATED and "contracted dim" in g.reason, (site, g)
        else:
            assert g.status is fqt.GemmStatus.LOWBIT_KERNEL, (site, g)


def test_every_contraction_is_a_site_or_a_skipped_row():
    """Regression: nn.Bilinear (aten._trilinear) gave 0 sites and no error even under strict.
    Every op torch's FLOP counter counts (formulas added for the ones it lacks) is listed."""
    bil = nn.Bilinear(4, 5, 3)
    x1, x2 = torch.randn(2, 4, requires_grad=True), torch.randn(2, 5)
    with pytest.warns(fqt.CoverageWarning, match="0.0% of the step's GEMM FLOPs"):
        report = fqt.explain(bil, x1, x2, recipe="int8", progress=False)
    rows = [(s.op, g.status.value, g.reason, g.flops) for s, g in report.rows()]
    assert rows and all(op == "aten._trilinear" and st == "skipped" and "no fqt matcher" in why for op, st, why, _ in rows), rows
    assert sum(f for *_, f in rows) == report.coverage.eager_flops == 3 * (2 * 2 * 3 * 4 * 5)  # fwd, grad of x1, grad of W
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="UnsupportedGraphError.*_trilinear"):
        fqt.explain(nn.Bilinear(4, 5, 3), x1, x2, strict=True, progress=False)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # the formulas registered for torch's counter too
        torch.mv(torch.randn(3, 4), torch.randn(4))
    assert counter.get_total_flops() == 2 * 3 * 4


def test_frames_dynamo_does_not_compile_show_in_the_coverage():
    """Regression: an nn.LSTM model compiled nothing and explain said '0 GEMM sites' silently."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    with pytest.warns(fqt.CoverageWarning, match="LSTM"):
        report = fqt.explain(Tagger(), torch.randn(2, 5, 8), progress=False)
    cov = report.coverage
    assert cov.share is not None and cov.share < 0.9 and cov.eager_flops > 0
    assert any("LSTM" in reason for reason, _ in cov.graph_breaks)
    assert "coverage:" in str(report) and "graph breaks" in str(report)


def test_a_fully_quantized_model_reports_full_coverage(recwarn):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    report = fqt.explain(model, torch.randn(3, 8, requires_grad=True), progress=False)
    assert report.coverage.share == 1.0 and report.coverage.quantized_flops == report.coverage.eager_flops
    assert not [w for w in recwarn if issubclass(w.category, fqt.CoverageWarning)]


@pytest.mark.parametrize("conv", [
    nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
    nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
    nn.ConvTranspose1d(3, 5, 4, stride=3),
], ids=["transposed-2d", "conv-2d", "transposed-1d"])
def test_convolution_flops_match_the_flop_counter(conv):
    """Each convolution GEMM counts the FLOPs torch's counter does (a transposed convolution's
    are its input positions times the weight, not its output positions), so the coverage
    share is whole, never above it."""
    x = torch.randn(2, conv.in_channels, *([5] * (conv.weight.dim() - 2)), requires_grad=True)
    report = fqt.explain(conv, x, recipe="int8", progress=False)
    flops = [g.flops for _, g in report.rows()]
    assert len(flops) == 3 and len(set(flops)) == 1, flops
    assert sum(flops) == report.coverage.eager_flops and report.coverage.share == 1.0


class _RuntimeChecks(nn.Module):
    """Model code with runtime checks: ``F.one_hot`` (which checks its classes on the device),
    ``torch._assert_async`` and a ``torch._check`` on a data-dependent count. AOTAutograd keeps
    them as ops that return nothing, which no pass may trip over."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(10, 8) / 3)
        self.proj = nn.Linear(8, 4)

    def forward(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        torch._assert_async(x.abs().sum() >= 0)
        positive = (x > 0).sum().item()
        torch._check(positive >= 0)
        return self.proj(F.one_hot(idx, 10).float() @ self.embed + x) * (positive + 1)


@pytest.mark.parametrize("inductor", [False, True], ids=["eager", "inductor"])
def test_runtime_checks_in_model_code_compile_and_train(inductor):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _RuntimeChecks()
    idx, x = torch.randint(0, 10, (6,)), torch.randn(6, 8)
    be = fqt.backend(recipe="int8", inductor=inductor)
    loss = torch.compile(model, backend=be)(idx, x).square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    statuses = [g.status.value for r in be.records for s in r.decisions for g in s.gemms]
    assert statuses and set(statuses) == {"lowbit-kernel"}, statuses
