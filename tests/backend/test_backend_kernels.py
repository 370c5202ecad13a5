"""execution="kernels" against execution="reference" on the coverage models.

Without Inductor both modes draw the stochastic roundings from the same generator in the same
order, so they must agree to fp32 round-off: the only difference is that realizable GEMMs run
as int8 GEMMs (exact integer accumulation) instead of fp32 GEMMs on dequantized values. With
Inductor the random stream differs, so the Inductor test uses nearest-rounding gradients.
"""

from __future__ import annotations

import pytest
import torch

import fqt_compiler as fqt
from fqt_compiler.int8_gemm import INT_MM, int8_gemm_provider
from fqt_compiler.specs import GemmKind

from tests.helpers.recipes import nearest_gradients

from tests.helpers.models import make_case, param_grads


def _run(case, **options):
    torch._dynamo.reset()
    case.model.zero_grad(set_to_none=True)
    be = fqt.backend(**options)
    compiled = torch.compile(case.model, backend=be)
    torch.manual_seed(1234)
    loss = case.loss(compiled)
    loss.backward()
    return loss.detach(), param_grads(case.model), be


def _close(a: torch.Tensor, b: torch.Tensor, rel: float, floor: float = 1e-12) -> bool:
    """max |a - b| <= rel * max(max |b|, floor): ``floor`` (the largest gradient anywhere in the
    model) keeps mathematically-zero gradients, pure round-off on both sides, out of the test."""
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), floor)


def _assert_grads_close(grads_k, grads_r, rel):
    """Equal to round-off, but for a few elements: the kernels' fp32 round-off (the integer
    sums scaled once, where the reference convolves dequantized values) can move a later
    quantizer's input across a rounding boundary, and that code then differs by one step,
    moving the gradient elements it reaches (seen: 16 of 216, one code of a transposed
    convolution's input reaching a 3x3 window in two channels)."""
    assert grads_k.keys() == grads_r.keys()
    scale = max(g.abs().max().item() for g in grads_r.values())
    for name in grads_r:
        k, r = grads_k[name], grads_r[name]
        if _close(k, r, rel, 1e-2 * scale):
            continue
        off = (k - r).abs() > rel * max(r.abs().max().item(), 1e-2 * scale)
        assert off.float().mean() <= 0.1 and (k - r).norm() <= 1e-2 * r.norm(), (name, int(off.sum()), off.numel(),
                                                                          float((k - r).norm() / r.norm()))


@pytest.mark.parametrize("recipe", ["int8", "psq8", "bhq5", "qat"])
@pytest.mark.parametrize("model", ["mlp", "cnn", "gpt"])
def test_kernels_mode_matches_reference_mode(model, recipe):
    case = make_case(model)
    loss_r, grads_r, _ = _run(case, recipe=recipe, execution="reference")
    loss_k, grads_k, be = _run(case, recipe=recipe, execution="kernels", inductor=False)
    assert _close(loss_k, loss_r, 1e-5)
    _assert_grads_close(grads_k, grads_r, 1e-4)
    statuses = [g.status for r in be.records for s in r.decisions for g in s.gemms]
    if model != "cnn" and recipe in ("int8", "psq8"):  # every Linear GEMM is realizable there
        assert fqt.GemmStatus.LOWBIT_KERNEL in statuses


def test_kernels_mode_reports_every_gemm_with_a_status_and_reason():
    case = make_case("gpt")
    report = fqt.explain(case.model, *case.inputs, recipe="int8", execution="kernels", inductor=False)
    assert report.counts()["skipped"] == 0
    for site, g in report.rows():
        if g.status is fqt.GemmStatus.SIMULATED:
            assert g.reason, (site, g)
        else:
            assert g.status is fqt.GemmStatus.LOWBIT_KERNEL and g.kernel


@pytest.mark.slow
def test_kernels_mode_with_inductor_matches_reference():
    case = make_case("mlp")
    recipe = nearest_gradients("int8")
    loss_r, grads_r, _ = _run(case, recipe=recipe, execution="reference")
    loss_k, grads_k, be = _run(case, recipe=recipe, execution="kernels", inductor=True)
    assert _close(loss_k, loss_r, 1e-5)
    _assert_grads_close(grads_k, grads_r, 1e-4)
    lowered = [g for r in be.records for s in r.decisions for g in s.gemms if g.status is fqt.GemmStatus.LOWBIT_KERNEL]
    assert len(lowered) == case.n_gemms
    # the code Inductor generated for both graphs can be retrieved, and calls the int8 GEMM
    # (torch._int_mm, or on a CPU that multiplies int8 slowly an fp32 library GEMM of the codes)
    sources = {k: v for r in be.records for k, v in r.kernel_sources.items()}
    assert {"inductor:graph0_forward", "inductor:graph0_backward"} <= sources.keys()
    call = "_int_mm" if int8_gemm_provider() == INT_MM else "extern_kernels.mm"
    assert all(call in v for k, v in sources.items() if k.startswith("inductor:"))


def _kernels_equal_reference(model, inputs, target, recipe):
    """One MSE step of ``model`` in reference mode and in kernels mode (no Inductor), same
    seed: losses and gradients equal to round-off; the kernels-mode backend."""

    def run(**options):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        be = fqt.backend(recipe=recipe, **options)
        torch.manual_seed(77)
        loss = torch.nn.functional.mse_loss(torch.compile(model, backend=be)(*inputs), target)
        loss.backward()
        return loss.detach(), param_grads(model), be

    loss_r, grads_r, _ = run(execution="reference")
    loss_k, grads_k, be = run(execution="kernels", inductor=False)
    assert _close(loss_k, loss_r, 1e-5)
    _assert_grads_close(grads_k, grads_r, 1e-4)
    return be


class _ConvZoo(torch.nn.Module):
    """Convolutions of every geometry the CPU kernels take: 1-D, strided and dilated 2-D,
    grouped, 3-D, and a 1x1 with bias."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Conv1d(3, 8, 5, stride=2, padding=2)
        self.c2 = nn.Conv2d(2, 6, 3, stride=2, padding=1, dilation=2, bias=False)
        self.c3 = nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False)
        self.c4 = nn.Conv3d(6, 4, (1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), bias=False)
        self.c5 = nn.Conv2d(4, 5, 1)

    def forward(self, seq, img):
        a = torch.relu(self.c1(seq)).mean(dim=2)
        h = torch.relu(self.c3(torch.relu(self.c2(img))))
        v = torch.relu(self.c4(h.unsqueeze(2))).squeeze(2)
        return a.sum(1) + self.c5(v).mean(dim=(1, 2, 3))


def _conv_zoo_case():
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = _ConvZoo()
    seq, img = torch.randn(3, 3, 11, generator=g), torch.randn(3, 2, 9, 9, generator=g)
    target = torch.randn(3, generator=g)
    return model, (seq, img), target


@pytest.mark.parametrize("recipe", ["int8", "ptq8", "psq8", "bhq8"])
def test_convolution_gemms_run_on_int8_kernels_and_match_reference(recipe):
    """Every convolution GEMM whose scale layout is realizable runs on an int8 kernel (all of
    them under int8 and ptq8; psq8 / bhq8 keep the paper's per-(channel, position) wgrad
    scales simulated, saying why), and the step equals the reference mode to round-off."""
    model, inputs, target = _conv_zoo_case()
    be = _kernels_equal_reference(model, inputs, target, recipe)
    gemms = [g for r in be.records for s in r.decisions for g in s.gemms]
    assert len(gemms) == 13  # 5 convolutions x 3 GEMMs, less c1's and c2's dgrad (the inputs need no grad)
    for g in gemms:
        if recipe in ("psq8", "bhq8") and g.kind is GemmKind.GRAD_WEIGHT:
            assert g.status is fqt.GemmStatus.SIMULATED and "vary along the contraction" in g.reason, g
        else:
            assert g.status is fqt.GemmStatus.LOWBIT_KERNEL, g


class _Transposed(torch.nn.Module):
    """Transposed convolutions (strided, grouped, output padding, 1-D) after a plain one."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.t = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.t1 = nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1, bias=False)

    def forward(self, x):
        h = torch.relu(self.t(torch.relu(self.c(x))))
        return self.t1(h.mean(2))


@pytest.mark.parametrize("recipe", ["int8", "ptq8", "bhq8"])
def test_transposed_convolutions_run_as_the_gemms_they_transpose(recipe):
    """A transposed convolution's forward runs on the dgrad kernel, its dgrad on the forward
    kernel, its wgrad on the wgrad kernel with the roles swapped; the recipe's per-output-channel
    weight is placed on the transposed weight's dim 1. Equal to the reference step."""
    torch.manual_seed(6)
    model, x = _Transposed(), torch.randn(3, 3, 5, 5)
    target = torch.randn(3, 4, 20)
    be = _kernels_equal_reference(model, (x,), target, recipe)
    transposed = [g for r in be.records for s in r.decisions[1:] for g in s.gemms]
    assert len(transposed) == 6
    for g in transposed:
        if recipe == "bhq8" and g.kind is GemmKind.GRAD_WEIGHT:
            assert g.status is fqt.GemmStatus.SIMULATED and "transposed" in g.reason, g
        else:
            assert g.status is fqt.GemmStatus.LOWBIT_KERNEL and g.kernel.startswith("transposed: "), g


class _Twice(torch.nn.Module):
    """One Linear called twice on one input: the partitioner computes the GEMM once."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) * self.fc(x).sigmoid()


def test_a_gemm_merged_with_an_identical_one_says_so_not_pending():
    report = fqt.explain(_Twice(), torch.randn(4, 8), recipe="int8", progress=False, forward_error=False)
    outputs = [g for _, g in report.rows() if g.kind is GemmKind.OUTPUT]
    assert len(outputs) == 2
    statuses = sorted(g.status.value for g in outputs)
    assert statuses == ["lowbit-kernel", "simulated"], outputs
    merged = next(g for g in outputs if g.status is fqt.GemmStatus.SIMULATED)
    assert "duplicate of an identical GEMM" in merged.reason and "pending" not in merged.reason
    assert not any("pending" in g.reason for _, g in report.rows())
