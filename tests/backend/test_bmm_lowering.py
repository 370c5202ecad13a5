"""Batched GEMMs of two activations (attention's ``bmm``, ``baddbmm``) run on the low-bit batched
GEMM in kernels mode: all three GEMMs of a site, with the same numbers as reference mode; what
cannot be realized (BHQ's T^-1 across batch entries) stays simulated and says why."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.sites import OperandSource
from fqt_compiler.specs import GemmKind
from tests.helpers.models import GPTBlock, param_grads


def _bmm_rows(report):
    return [(s, g) for s, g in report.rows() if s.op in ("aten.bmm", "aten.baddbmm")]


def _step(model, inputs, target_fn, **options):
    """One step in kernels mode (no Inductor) and in reference mode, same seed: (loss, grads) each."""
    out = []
    for execution in ("kernels", "reference"):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss = target_fn(torch.compile(model, backend=fqt.backend(execution=execution, inductor=False, **options))(*inputs))
        loss.backward()
        out.append((loss.detach(), param_grads(model)))
    return out


def _assert_close(kernels, reference, rel=1e-4):
    (lk, gk), (lr, gr) = kernels, reference
    assert abs(lk.item() - lr.item()) <= 1e-5 * abs(lr.item())
    scale = max(g.abs().max().item() for g in gr.values())
    for name in gr:
        assert (gk[name] - gr[name]).abs().max().item() <= rel * scale, name


@pytest.mark.parametrize("recipe", ["int8", "psq8", "ptq8"])
def test_attention_bmm_gemms_are_all_lowered(recipe):
    torch.manual_seed(0)
    model, idx = GPTBlock(), torch.randint(0, 16, (2, 6))
    report = fqt.explain(model, idx, recipe=recipe, progress=False, forward_error=False)
    assert report.counts() == {"lowbit-kernel": GPTBlock.n_gemms, "simulated": 0, "skipped": 0}
    rows = _bmm_rows(report)
    kinds = [GemmKind.OUTPUT, GemmKind.GRAD_LHS, GemmKind.GRAD_RHS] * 2
    assert sorted(g.kind.value for _, g in rows) == sorted(k.value for k in kinds)
    assert all("batched" in g.kernel for _, g in rows)
    # int8 scales the forward operands per row, which varies along both backward contractions:
    # the backward GEMMs read them re-quantized per channel; the paper's per-tensor ones are reused
    want = OperandSource.REQUANTIZED if recipe == "int8" else OperandSource.REUSES_OUTPUT
    for _, g in rows:
        if g.kind is not GemmKind.OUTPUT:
            assert g.operands[1].source is want, g


@pytest.mark.parametrize("recipe", ["int8", "psq8", "bhq8"])
def test_attention_kernels_mode_matches_reference_mode(recipe):
    torch.manual_seed(0)
    model, idx = GPTBlock(), torch.randint(0, 16, (3, 6))
    _assert_close(*_step(model, (idx,), lambda y: y.square().mean(), recipe=recipe))


def test_bhq_on_a_batched_gemm_stays_simulated_and_says_why():
    torch.manual_seed(0)
    report = fqt.explain(GPTBlock(), torch.randint(0, 16, (2, 6)), recipe="bhq8", progress=False, forward_error=False)
    for _, g in _bmm_rows(report):
        if g.kind is GemmKind.GRAD_LHS:  # BHQ's gradient: its T^-1 mixes rows of different batch entries
            assert g.status is fqt.GemmStatus.SIMULATED and "mixes batch entries" in g.reason
        else:
            assert g.status is fqt.GemmStatus.LOWBIT_KERNEL


class _Scaled(nn.Module):
    """``baddbmm`` and ``addmm`` with a full input matrix and alpha / beta: the product is the
    low-bit GEMM, the rest is added around it."""

    def __init__(self, beta: float, alpha: float) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 5) / math.sqrt(8))
        self.beta, self.alpha = beta, alpha

    def forward(self, x: torch.Tensor, bias3: torch.Tensor, bias2: torch.Tensor) -> torch.Tensor:
        att = torch.baddbmm(bias3, self.q(x), self.k(x).transpose(1, 2), beta=self.beta, alpha=self.alpha)
        flat = self.v(x).reshape(-1, 8)
        lin = torch.addmm(bias2, flat, self.w, beta=self.beta, alpha=self.alpha)
        return att.sum() + lin.square().sum()


@pytest.mark.parametrize("beta,alpha", [(1.0, 1.0), (0.5, 2.0), (0.0, 0.25)])
def test_baddbmm_and_addmm_with_alpha_beta_are_lowered(beta, alpha):
    torch.manual_seed(0)
    model = _Scaled(beta, alpha)
    x = torch.randn(2, 6, 8)
    bias3, bias2 = torch.randn(2, 6, 6), torch.randn(12, 5)
    if beta == 0:  # torch ignores the input when beta is 0, NaN included
        bias3[0, 0, 0] = bias2[0, 0] = float("nan")
    report = fqt.explain(model, x, bias3, bias2, recipe="psq8", progress=False, forward_error=False)
    for site, g in report.rows():
        if site.op in ("aten.baddbmm", "aten.addmm") and g.kind is GemmKind.OUTPUT:
            assert g.status is fqt.GemmStatus.LOWBIT_KERNEL, (site.op, g.reason)
    kernels, reference = _step(model, (x, bias3, bias2), lambda y: y, recipe="psq8")
    assert torch.isfinite(kernels[0])
    _assert_close(kernels, reference)
