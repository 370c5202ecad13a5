"""GPU-only checks (skipped without CUDA): the compiled Triton kernels against the reference
on the GPU, and a training step in kernels mode. The kernels are compiled without FMA
contraction (``enable_fp_fusion=False``) and divide with IEEE rounding, and the eager reference
runs one rounding per op, so codes and statistics agree bit for bit."""

from __future__ import annotations

import pytest
import torch

import fqt_compiler as fqt
from fqt_compiler.grid import QOperand
from fqt_compiler.layout import Layout
from fqt_compiler.reference import qmm_ref, quantize_ref
from tests.helpers.kernel_cases import assert_same

pytestmark = pytest.mark.gpu

SPECS = [
    fqt.QuantSpec(granularity="row"),
    fqt.QuantSpec(granularity="column", rounding="stochastic"),
    fqt.QuantSpec(scheme="asym", bits=4, rounding="stochastic"),
    fqt.QuantSpec(format="fp8_e4m3", granularity="row"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short().replace(" ", "-"))
def test_gpu_quantize_kernel_matches_reference(spec):
    from fqt_compiler.codegen.kernels.quantize import quantize

    x = torch.randn(1000, 777, device="cuda")
    seed = torch.tensor([9], device="cuda")
    got = quantize(x, spec, Layout.PENULTIMATE, seed=seed)
    ref = quantize_ref(x, spec, Layout.PENULTIMATE, seed=seed)
    assert_same(got, ref)


def test_gpu_qmm_matches_reference():
    from fqt_compiler.codegen.kernels.qmm import qmm

    a = torch.randint(-127, 128, (1024, 512), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (768, 512), device="cuda", dtype=torch.int8).t()
    sa, sb = torch.rand(1024, 1, device="cuda"), torch.rand(1, 768, device="cuda")
    torch.testing.assert_close(
        qmm(QOperand(a, sa), QOperand(b, sb)), qmm_ref(QOperand(a, sa), QOperand(b, sb)), rtol=1e-6, atol=1e-3
    )


@pytest.mark.parametrize("recipe", ["int8", "bhq5", "fp8"])
def test_gpu_training_step_kernels_mode(recipe):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    x = torch.randn(64, 256, device="cuda")
    be = fqt.backend(recipe=recipe)
    loss = torch.compile(model, backend=be)(x).square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    statuses = [g.status for r in be.records for s in r.decisions for g in s.gemms]
    assert statuses.count(fqt.GemmStatus.LOWBIT_KERNEL) >= 4
    assert any(k.startswith("triton:") for r in be.records for k in r.kernel_sources)


@pytest.mark.parametrize("recipe", ["int8", "ptq8"])
def test_gpu_fused_step_reads_k_major_codes_and_folds_statistics(recipe):
    """On CUDA (fusion="auto"): generated kernels, codes written K-major for every low-bit
    GEMM (column-major or both orders, saved ones too), the next quantizer's statistics gathered
    in a GEMM epilogue; against the unfused step within stochastic-rounding noise."""
    from fqt_compiler.codegen import FusedEpilogue

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    x = torch.randn(4, 64, 256, device="cuda")
    losses = {}
    for fusion in ("off", "auto"):
        for p in model.parameters():
            p.grad = None
        torch._dynamo.reset()
        be = fqt.backend(recipe=recipe, fusion=fusion)
        loss = torch.compile(model, backend=be)(x).square().mean()
        loss.backward()
        losses[fusion] = loss.item()
    layouts = [c for r in be.records for c in r.layouts]
    assert layouts and any(c.layout.name in ("COLUMN_MAJOR", "BOTH") for c in layouts)
    assert any(isinstance(f, FusedEpilogue) and f.ops[0].startswith("statistics of") for r in be.records for f in r.fused)
    assert abs(losses["auto"] - losses["off"]) <= 1e-3 * abs(losses["off"])


@pytest.mark.parametrize("recipe", ["int8", "fp8", "bhq5"])
def test_gpu_inductor_launches_fqt_kernels_itself(recipe):
    """Under Inductor on CUDA no fqt op is left for Python: every fqt Triton kernel is launched
    from Inductor's generated code (the launch table says so), and the step trains."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    x = torch.randn(4, 64, 256, device="cuda")
    be = fqt.backend(recipe=recipe)
    loss = torch.compile(model, backend=be)(x).square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    launches = [launch for r in be.records for launch in r.launches]
    assert {launch.stage for launch in launches} == {"forward", "backward"}
    assert all(launch.python_calls == () for launch in launches), [launch.python_calls for launch in launches]
    assert all(launch.fqt_kernels > 0 for launch in launches)
    code = "\n".join(v for r in be.records for k, v in r.kernel_sources.items() if k.startswith("inductor:"))
    assert "torch.ops.fqt" not in code


def test_gpu_reduce_overhead_captures_cuda_graphs():
    """mode="reduce-overhead" with fqt: the step replays a CUDA graph and trains like the
    default mode (stochastic rounding aside: losses within 1%)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    x = torch.randn(4, 64, 256, device="cuda")
    losses = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        # torch.compile takes mode= or options=, not both: the recipe goes in fqt.backend(...)
        compiled = torch.compile(model, backend=fqt.backend(recipe="int8"), mode=mode)
        for _ in range(4):  # warm-up, recording, replays
            for p in model.parameters():
                p.grad = None
            loss = compiled(x).square().mean()
            loss.backward()
        losses[mode] = loss.item()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(losses["reduce-overhead"] - losses["default"]) <= 1e-2 * abs(losses["default"])
