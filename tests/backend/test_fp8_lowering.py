"""The fp8 recipe's GEMMs are lowered to the low-bit kernel on CUDA, its backward GEMMs too:
their operands are e5m2 gradients times e4m3 weights / activations, a pair sm_90's fp8 MMA
takes. Checked without a GPU by lowering the graphs the backend traced, re-typed for a CUDA
device (nothing runs there); on the CPU the same GEMMs stay simulated, with the reason."""

from __future__ import annotations

import torch
from torch import nn

from fqt_compiler import pipeline
import fqt_compiler as fqt
from fqt_compiler.codegen.lower import lower_gemms
from fqt_compiler.sites import GemmStatus
from fqt_compiler.specs import GemmKind
from tests.helpers.sm90 import as_cuda_graph


def _lower_for_cuda(monkeypatch, model: nn.Module, x: torch.Tensor, recipe: str):
    """Train one step on the CPU; every partitioned graph is also lowered as if for CUDA."""
    lowered = []
    real = pipeline.compile_partitioned

    def spy(gm, ctx):
        lowered.extend(lower_gemms(as_cuda_graph(gm)))
        return real(gm, ctx)

    monkeypatch.setattr(pipeline, "compile_partitioned", spy)
    be = fqt.backend(recipe=recipe, inductor=False)
    torch.compile(model, backend=be)(x).square().mean().backward()
    return lowered, be


def test_fp8_backward_gemms_lower_on_cuda(monkeypatch):
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    lowered, be = _lower_for_cuda(monkeypatch, model, torch.randn(4, 8, 32), "fp8")
    kinds = {(r.site_id, r.gemm): r for r in lowered}
    # two sites: three GEMMs each, but the first layer's grad_input is not needed (x needs no grad)
    assert len(kinds) == 5, kinds
    assert all(r.status is GemmStatus.LOWBIT_KERNEL for r in lowered), [(r.gemm, r.reason) for r in lowered]
    backward = [r for r in lowered if r.gemm is not GemmKind.OUTPUT]
    assert backward and all("e5m2 x e4m3" in r.kernel for r in backward), [r.kernel for r in backward]
    assert all(r.kernel == "triton qmm" for r in lowered if r.gemm is GemmKind.OUTPUT)
    # on the CPU itself no fp8 GEMM is fast: simulated, and the table says why
    cpu = [g for r in be.records for s in r.decisions for g in s.gemms]
    assert cpu and all(g.status is GemmStatus.SIMULATED and "no fast fp8 GEMM on cpu" in g.reason for g in cpu)


def test_int8_by_fp8_codes_are_never_paired(monkeypatch):
    """A rule mixing an int8 weight with an fp8 activation: no GEMM takes that pair, on any
    device; the GEMM is simulated and the reason names both dtypes."""
    recipe = fqt.recipe("fp8")
    mixed = fqt.Recipe(name="mixed", output=recipe.output.__class__(
        activation=recipe.output.activation, weight=fqt.QuantSpec(granularity="row")),
        grad_input=recipe.grad_input, grad_weight=recipe.grad_weight)
    lowered, _ = _lower_for_cuda(monkeypatch, nn.Linear(32, 16), torch.randn(8, 32), mixed)
    out = [r for r in lowered if r.gemm is GemmKind.OUTPUT]
    assert out and all(r.status is GemmStatus.SIMULATED and "differ in dtype" in r.reason for r in out)
    assert "float8_e4m3fn" in out[0].reason and "int8" in out[0].reason
