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
    assert grads_k.keys() == grads_r.keys()
    scale = max(g.abs().max().item() for g in grads_r.values())
    for name in grads_r:
        assert _close(grads_k[name], grads_r[name], rel, 1e-2 * scale), name


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
    sources = {k: v for r in be.records for k, v in r.kernel_sources.items()}
    assert {"inductor:graph0_forward", "inductor:graph0_backward"} <= sources.keys()
    assert all("_int_mm" in v for k, v in sources.items() if k.startswith("inductor:"))
