"""The roofline cost model and ``never_slower``: sites the model says cannot win stay in high
precision, recorded as ``by-cost`` with the estimate; sites that win are untouched."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fqt_compiler as fqt
from fqt_compiler import int8_gemm
from fqt_compiler.cost import (CPU_AVX2_2CORE, CPU_EPYC_2CORE, H100, DeviceProfile, Slot, default_profile, profile_for,
                               set_profile, site_cost)
from fqt_compiler.sites import SkipKind
from fqt_compiler.specs import GemmKind


def _specs(recipe: str) -> dict:
    r = fqt.recipe(recipe)
    out, gi, gw = GemmKind.OUTPUT, GemmKind.GRAD_INPUT, GemmKind.GRAD_WEIGHT
    return {
        (out, Slot.LHS): r.output.activation, (out, Slot.RHS): r.output.weight,
        (gi, Slot.GRAD): r.grad_input.grad_output, (gi, Slot.RHS): r.grad_input.weight,
        (gw, Slot.GRAD): r.grad_weight.grad_output, (gw, Slot.LHS): r.grad_weight.activation,
    }


CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _vnni_cpu_profile():
    """The verdicts below are those of the profile measured on a VNNI CPU, whatever CPU runs them
    (this one's default depends on its int8 GEMM: :func:`test_the_default_cpu_profile_follows_the_int8_gemm`)."""
    set_profile("cpu", CPU_EPYC_2CORE)
    yield
    set_profile("cpu", None)


def test_cpu_model_reproduces_the_measured_layer_verdicts():
    """docs/benchmarks.md (2-core EPYC): int8 wins from 512^3 (1.41x), bhq8 loses at 512^3
    (0.96x) and wins at 1024^3 (1.67x)."""
    assert site_cost((512, 512, 512), _specs("int8"), CPU, 4).wins
    assert not site_cost((512, 512, 512), _specs("bhq8"), CPU, 4).wins
    assert site_cost((1024, 1024, 1024), _specs("bhq8"), CPU, 4).wins
    assert site_cost((2048, 768, 3072), _specs("psq8"), CPU, 4).wins


def test_small_gemms_and_simulated_gemms_never_win():
    assert not site_cost((8, 16, 16), _specs("int8"), CPU, 4).wins  # quantization dominates
    # no low-bit kernel (batched matmuls): quantize-dequantize on top of the same GEMM
    assert not site_cost((4096, 4096, 4096), _specs("int8"), CPU, 4, gemm_kernel=False).wins


def test_convolution_sites_quantize_each_tensor_once():
    """A convolution's implicit GEMM reads an activation element once per kernel position;
    its quantizer reads it once: the cost counts the tensors, not the GEMM operands."""
    n, c, k, hw = 32, 256, 256, 14
    dims = (n * hw * hw, c * 9, k)  # 3x3, stride 1, 'same' padding
    tensors = (n * c * hw * hw, k * c * 9, n * k * hw * hw)
    as_gemm = site_cost(dims, _specs("int8"), CPU, 4)
    as_conv = site_cost(dims, _specs("int8"), CPU, 4, operand_elements=tensors)
    assert as_conv.lowbit_s < as_gemm.lowbit_s and as_conv.hp_s == as_gemm.hp_s
    # depthwise: 9 products per output, nothing for a low-bit GEMM to win back its quantizers with
    depthwise = site_cost((n * hw * hw, 9, c), _specs("int8"), CPU, 4, operand_elements=(tensors[0], c * 9, tensors[0]))
    assert not depthwise.wins


def test_h100_roofline_wins_at_large_shapes_only():
    cuda = torch.device("cuda")
    assert profile_for(cuda) is H100
    assert site_cost((16384, 8192, 8192), _specs("int8"), cuda, 2).wins
    assert not site_cost((64, 768, 768), _specs("int8"), cuda, 2).wins
    big = site_cost((16384, 8192, 8192), _specs("int8"), cuda, 2)
    assert big.hp_s > big.lowbit_s > big.hp_s / 2.5  # bounded by the 2x int8 peak and the quantize traffic


def test_fp8_has_no_cpu_gemm():
    assert not site_cost((2048, 2048, 2048), _specs("fp8"), CPU, 4).wins


def test_profiles_can_be_replaced():
    fast_quant = DeviceProfile("test", hp_flops=1e12, lowbit_flops=4e12, mem_bw=1e11, quant_bw=1e12)
    try:
        set_profile("cpu", fast_quant)
        assert site_cost((512, 512, 512), _specs("bhq8"), CPU, 4).wins
    finally:
        set_profile("cpu", CPU_EPYC_2CORE)
    with pytest.raises(TypeError, match="DeviceProfile"):
        set_profile("cpu", {"hp_flops": 1})


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.small, self.big = nn.Linear(16, 512), nn.Linear(512, 512)

    def forward(self, x):
        return self.big(torch.relu(self.small(x)))


@pytest.mark.parametrize("recipe,big_quantized", [("int8", True), ("bhq8", False)])
def test_never_slower_keeps_losing_sites_in_high_precision(recipe, big_quantized):
    torch.manual_seed(0)
    report = fqt.explain(TwoLinears(), torch.randn(512, 16), recipe=recipe, never_slower=True, inductor=False)
    by_module = {}
    for rec in report.records:
        for site in rec.decisions:
            by_module[site.module_path] = site.gemms
    small = by_module["small"]
    assert all(g.skip_kind is SkipKind.BY_COST and "cost model" in g.reason for g in small)  # K = 16: cannot win
    assert all((g.skip_kind is None) == big_quantized for g in by_module["big"])
    assert "by-cost" in report.table() or "cost model" in report.table()


class DepthwiseThenDense(nn.Module):
    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
        self.dense = nn.Conv2d(64, 256, 3, padding=1, bias=False)

    def forward(self, x):
        return self.dense(torch.relu(self.depthwise(x)))


def test_never_slower_keeps_depthwise_convolutions_in_high_precision():
    """Convolutions are costed as the kernels run them: a depthwise one (9 products per output)
    cannot win back its quantizers and stays in high precision; a dense 3x3 is costed too, with
    each tensor quantized once (not once per kernel position)."""
    torch.manual_seed(0)
    report = fqt.explain(DepthwiseThenDense(), torch.randn(8, 64, 28, 28), recipe="int8", never_slower=True,
                         inductor=False, progress=False)
    by_module = {site.module_path: site.gemms for rec in report.records for site in rec.decisions}
    assert all(g.skip_kind is SkipKind.BY_COST and "cost model" in g.reason for g in by_module["depthwise"])
    dense = site_cost((8 * 28 * 28, 64 * 9, 256), _specs("int8"), CPU, 4,
                      operand_elements=(8 * 64 * 28 * 28, 256 * 64 * 9, 8 * 256 * 28 * 28))
    assert all((g.skip_kind is None) == dense.wins for g in by_module["dense"])


class BigScores(nn.Module):
    """Two batched GEMMs of activations, the first (4, 1024, 256) @ (4, 256, 1024)."""

    def forward(self, a, b, c):
        return torch.bmm(torch.bmm(a, b), c)


@pytest.mark.parametrize("inductor", [False, True])
def test_never_slower_costs_batched_gemms_as_they_run(inductor, monkeypatch):
    """On a CPU with fast int8 GEMMs a batched GEMM run eagerly multiplies int8 per entry, and
    a large one wins; under Inductor it runs as fp32 GEMMs of the codes, so quantizing only
    costs, and the site stays in high precision. The estimate covers the whole batch."""
    from tests.helpers.int8_provider import forced_provider

    torch.manual_seed(0)
    args = (torch.randn(4, 1024, 256), torch.randn(4, 256, 1024), torch.randn(4, 1024, 64))
    with forced_provider("int_mm"):
        report = fqt.explain(BigScores(), *args, recipe="int8", never_slower=True, inductor=inductor, progress=False,
                             forward_error=False)
    first = report.sites[0].gemms[0]
    if inductor:
        assert first.skip_kind is SkipKind.BY_COST, first
        low, high = (float(x) for x in re.findall(r"~(\d+) us", first.reason))
        whole = site_cost((1024, 256, 1024), {(GemmKind.OUTPUT, Slot.LHS): fqt.recipe("int8").output.activation,
                                             (GemmKind.OUTPUT, Slot.RHS): fqt.recipe("int8").output.activation},
                          CPU, 4, gemm_kernel=False)
        assert high == pytest.approx(4 * whole.hp_s * 1e6, rel=0.01)
    else:
        assert first.skip_kind is None and first.status is fqt.GemmStatus.LOWBIT_KERNEL, first


def test_never_slower_off_changes_nothing_and_needs_kernels_mode():
    torch.manual_seed(0)
    report = fqt.explain(TwoLinears(), torch.randn(512, 16), recipe="bhq8", inductor=False)
    assert all(g.skip_kind is None for r in report.records for s in r.decisions for g in s.gemms)
    with pytest.raises(fqt.OptionsError, match="never_slower=True .* execution='reference'"):
        fqt.backend(execution="reference", never_slower=True)


def test_prologue_fusion_is_what_makes_gpt2_widths_win_on_h100():
    """The issue's premise, in the model: at GPT-2-small widths the standalone quantize passes
    eat the 8-bit GEMM's gain; fused into their producers, the site wins."""
    cuda = torch.device("cuda")
    assert not site_cost((16384, 768, 3072), _specs("int8"), cuda, 2).wins
    assert site_cost((16384, 768, 3072), _specs("int8"), cuda, 2, fused=True).wins


def _gpu_check_doc(name: str = "NVIDIA H200") -> dict:
    """A gpu-check results document as a GPU run writes it (the fields the profile reads)."""
    gemm = []
    for size, scale in ((1024, 0.5), (4096, 1.0)):
        for role in ("fprop", "dgrad", "wgrad"):
            gemm += [
                {"gemm": [size, size, size], "role": role, "kernel": "bfloat16 torch.mm", "tflops": 600.0 * scale},
                {"gemm": [size, size, size], "role": role, "kernel": "fqt int8 (triton qmm)", "tflops": 1000.0 * scale},
                {"gemm": [size, size, size], "role": role, "kernel": "fqt fp8 e4m3 x e4m3 (triton qmm)", "tflops": 900.0},
            ]
    quant = [{"shape": [16384, 16384], "spec": s, "gb_s": bw, "copy_gb_s": 4000.0}
             for s, bw in (("int8 per row", 3000.0), ("int8 per tensor", 2000.0), ("fp8", 3200.0))]
    quant.append({"shape": [16384, 768], "spec": "int8 per row", "gb_s": 1.0, "copy_gb_s": 1.0})
    return {"dry_run": False, "started": "2026-11-29T00:00:00Z", "stages": {
        "preflight": {"results": {"device": {"name": name, "torch": "2.11.0", "triton": "3.6.0"}}},
        "gemm": {"results": {"items": gemm}},
        "quantize": {"results": {"items": quant}},
    }}


def test_a_gpu_check_run_becomes_the_devices_profile(tmp_path, monkeypatch):
    from fqt_compiler.cost import profile_from_gpu_check
    from fqt_compiler.measured import profile_path, save_measured_fields

    monkeypatch.setenv("FQT_PROFILE_DIR", str(tmp_path))
    doc = _gpu_check_doc()
    p = profile_from_gpu_check(doc)  # medians at the largest shape only
    assert (p.hp_flops, p.lowbit_flops, p.mem_bw, p.quant_bw) == (600e12, 1000e12, 4000e9, 3000e9)
    assert p.efficiency == 1.0 and p.fp8_gemm and "H200" in p.name and "gpu-check" in p.source

    import fqt_compiler.cost as cost

    cuda = torch.device("cuda")
    monkeypatch.setattr(cost, "_GEMM_TIMER", None)  # the roofline's GEMMs: this test is about the profile
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert profile_for(cuda) is H100  # nothing measured yet: the datasheet
    path = save_measured_fields(doc)
    assert path == profile_path("NVIDIA H200") and path.parent == tmp_path
    assert profile_for(cuda) == p
    # the measured profile changes decisions: a shape the datasheet roofline calls a win is not
    # one where bf16 reaches 600 of int8's 1000 TFLOPS and quantization moves 3 TB/s
    shape = (4096, 1024, 1024)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    datasheet = site_cost(shape, _specs("int8"), cuda, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    measured = site_cost(shape, _specs("int8"), cuda, 2)
    assert measured.profile == p and measured.hp_s != datasheet.hp_s
    # set_profile still wins; None goes back to the measured one
    set_profile("cuda", H100)
    try:
        assert profile_for(cuda) is H100
    finally:
        set_profile("cuda", None)
    assert profile_for(cuda) == p
    # another device name has no measured profile
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    assert profile_for(cuda) is H100


def test_unusable_gpu_check_results_say_why(tmp_path, monkeypatch):
    from fqt_compiler.cost import profile_from_gpu_check
    from fqt_compiler.measured import profile_path

    with pytest.raises(fqt.OptionsError, match="dry run"):
        profile_from_gpu_check({**_gpu_check_doc(), "dry_run": True})
    doc = _gpu_check_doc()
    del doc["stages"]["quantize"]
    with pytest.raises(fqt.OptionsError, match="'quantize' stage"):
        profile_from_gpu_check(doc)
    monkeypatch.setenv("FQT_PROFILE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    profile_path("NVIDIA H200").write_text('{"profile": {"hp_flops": "fast"}}')
    with pytest.raises(fqt.OptionsError, match="unreadable"):
        profile_for(torch.device("cuda"))


def test_never_slower_compares_against_bf16_where_the_cpu_has_it():
    """With bf16 units an fp32 site must beat the faster of fp32 and bf16; a bf16 site is
    costed at bf16's rate. Profiles without bf16 (0) keep fp32 alone."""
    import dataclasses

    shape = (2048, 2048, 2048)
    no_bf16 = site_cost(shape, _specs("int8"), CPU, 4)
    assert no_bf16.wins and no_bf16.profile.bf16_flops == 0.0
    amx = dataclasses.replace(CPU_EPYC_2CORE, name="bf16 CPU", bf16_flops=2.0e12, lowbit_flops=2.2e12)
    set_profile("cpu", amx)
    try:
        fp32 = site_cost(shape, _specs("int8"), CPU, 4)
        bf16 = site_cost(shape, _specs("int8"), CPU, 2)
        assert not fp32.wins and "bf16 CPU" in fp32.reason()  # int8 at 1.1x bf16 cannot pay for its quantizers
        assert fp32.hp_s == pytest.approx(bf16.hp_s)  # the fp32 site is costed as bf16, its faster option
        assert fp32.hp_s < no_bf16.hp_s / 5
    finally:
        set_profile("cpu", None)


def test_cpu_profiles_are_filed_by_model_and_threads(tmp_path, monkeypatch):
    import dataclasses

    from fqt_compiler.measured import cpu_name, save_fields

    monkeypatch.setenv("FQT_PROFILE_DIR", str(tmp_path))
    set_profile("cpu", None)
    assert f"({torch.get_num_threads()} threads)" in cpu_name()
    assert profile_for(CPU) is default_profile("cpu")
    mine = dataclasses.replace(CPU_EPYC_2CORE, name="this CPU (measured by fqt calibrate)", bf16_flops=1e12)
    save_fields(cpu_name(), dataclasses.asdict(mine))
    assert profile_for(CPU) == mine
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)  # another thread count: not what was measured
        assert profile_for(CPU) is default_profile("cpu")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("provider,profile", [("int_mm", CPU_EPYC_2CORE), ("fp32", CPU_AVX2_2CORE)])
def test_the_default_cpu_profile_follows_the_int8_gemm(provider, profile, monkeypatch):
    """A CPU whose int8 GEMM is ``torch._int_mm`` (int8 dot-product instructions) defaults to the
    VNNI profile; one whose int8 GEMM runs on fp32 units to the AVX2 one, where no int8 site
    can beat fp32 and ``never_slower`` keeps them all in high precision."""
    monkeypatch.setenv("FQT_CPU_INT8_GEMM", provider)
    int8_gemm.int8_gemm_provider.cache_clear()
    set_profile("cpu", None)
    try:
        assert default_profile("cpu") is profile and profile_for(CPU) is profile
        assert site_cost((2048, 2048, 2048), _specs("int8"), CPU, 4).wins == (profile is CPU_EPYC_2CORE)
    finally:
        int8_gemm.int8_gemm_provider.cache_clear()


@pytest.mark.slow  # about 10 s: compiles and times the quantizers
def test_fqt_calibrate_measures_and_saves_this_cpu(tmp_path, monkeypatch, capsys):
    from fqt_compiler.tools.cli import main

    monkeypatch.setenv("FQT_PROFILE_DIR", str(tmp_path))
    set_profile("cpu", None)  # the measured profile, not the pinned one
    assert main(["calibrate", "--size", "128", "--reps", "2"]) == 0
    assert "saved to" in capsys.readouterr().out
    p = profile_for(CPU)
    assert "measured by fqt calibrate" in p.name
    assert p.hp_flops > 0 and p.lowbit_flops > 0 and p.quant_bw > 0 and p.bhq_passes > 0 and p.mem_bw > 0
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_on_a_gpu_never_slower_compares_measured_gemms(monkeypatch):
    """With a GPU the site's GEMMs are measured (bf16 beside the fastest low-bit provider,
    ``codegen.providers.gemm_seconds``); only the quantization is modelled."""
    import fqt_compiler.cost as cost

    calls = []

    def timer(shape, a, b, device):
        calls.append(shape)
        return 1e-3, 2e-3  # low-bit twice as slow as bf16: nothing can win

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU without a measured profile")
    monkeypatch.setattr(cost, "_GEMM_TIMER", timer)
    c = site_cost((16384, 8192, 8192), _specs("int8"), torch.device("cuda"), 2)
    assert sorted(calls) == sorted([(16384, 8192, 8192), (16384, 8192, 8192), (8192, 16384, 8192)])
    assert c.hp_s == pytest.approx(3e-3) and c.lowbit_s > 6e-3 and not c.wins
    # the codegen stage registers the device measurement on import
    import fqt_compiler.codegen.providers as providers

    monkeypatch.setattr(cost, "_GEMM_TIMER", None)
    cost.set_gemm_timer(providers.gemm_seconds)
    assert cost._GEMM_TIMER is providers.gemm_seconds
