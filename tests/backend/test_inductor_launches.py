"""Kernels Inductor launches itself: on a graph compiled for CUDA, every fqt kernel op becomes
the trace of its launcher (torch ops plus Triton-kernel nodes), so Inductor's generated code
launches fqt's kernels with no Python call per op and the step can be captured by CUDA graphs.

Checked without a GPU: the graphs a CPU training step traced are re-typed for a fake CUDA
device and run through the compile steps as they would be on a GPU, up to the graph handed to
Inductor (nothing runs, nothing is compiled for the device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.codegen.launches import KernelLaunches, source_launches
from tests.helpers.sm90 import ROOT


CASES = ["int8:auto", "int8:off", "fp8:auto", "psq8:auto", "ptq4:auto"]


@pytest.fixture(scope="module")
def cuda_steps() -> dict:
    """What the graphs handed to Inductor hold, for every case: one fresh process, without
    Triton's interpreter (the traces need the kernels as a GPU sees them)."""
    return _fake_cuda_steps(CASES)


def _fake_cuda_steps(cases: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.fake_cuda_steps", *cases], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(zip(cases, out["cases"]))


CONV_CASES = ["conv/int8:auto", "conv/int8:off", "conv/fp8:auto", "conv/ptq8:auto", "resnet/int8:auto"]


@pytest.fixture(scope="module")
def conv_cuda_steps() -> dict:
    """The same for a network of convolutions (strided, grouped, 1-D)."""
    return _fake_cuda_steps(CONV_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CONV_CASES)
def test_cuda_convolutions_are_triton_implicit_gemms_inductor_launches(conv_cuda_steps, case):
    """On CUDA every convolution GEMM is lowered (fprop and dgrad on the implicit-GEMM kernel,
    wgrad on the GEMM kernel per kernel offset, or small groups' as one batched GEMM per offset;
    zero-point corrections as torch ops) and the
    graph handed to Inductor launches them itself: no fqt op is left as a Python call."""
    graphs = conv_cuda_steps[case]
    assert {g["stage"] for g in graphs} == {"forward", "backward"}
    for g in graphs:
        assert "fqt.qconv.default" in g["ops_before"]
        assert g["fqt_calls_after"] == [] and g["python_calls"] == []
        assert "conv_kernel" in g["kernel_names"] and g["fqt_kernels"] == g["kernel_nodes"]
        assert g["strides_same"]
        # a grouped convolution with small groups computes its wgrad as one batched GEMM per
        # kernel offset (a launch per group would be thousands for a depthwise layer)
        grouped = "fp64 batched GEMM of the codes per kernel offset (grouped wgrad, exact)"
        assert g["kernels"] and all(k.startswith("triton ") or k == grouped for k in g["kernels"]), g["kernels"]
    backward = next(g for g in graphs if g["stage"] == "backward")
    assert "qmm_kernel" in backward["kernel_names"]  # wgrad
    assert any("(dgrad)" in k for k in backward["kernels"]) and any("(wgrad)" in k for k in backward["kernels"])
    if case == "resnet/int8:auto":
        # a channels-last network's activations are never copied in the forward: the fused
        # quantizers read broadcast parameters and channels-last leaves where they lie, and write
        # channels-last codes, which the convolution kernels read as they are
        forward = next(g for g in graphs if g["stage"] == "forward")
        assert forward["clones"] == [], forward["clones"]


@pytest.mark.parametrize("case", CASES)
def test_cuda_graph_for_inductor_holds_triton_kernels_and_no_fqt_call(cuda_steps, case):
    graphs = cuda_steps[case]
    assert {g["stage"] for g in graphs} == {"forward", "backward"}
    for g in graphs:
        # without Inductor every fqt op of the lowered graph is a kernel op with a traceable launcher
        assert g["ops_before"] and g["kernel_ops_before"] == len(g["ops_before"]), g["ops_before"]
        assert "inline_kernel_launches" in g["ran"]
        assert g["fqt_calls_after"] == [] and g["python_calls"] == []
        # every op launches one kernel or more (per-tensor scales: a statistics kernel too)
        assert g["kernel_nodes"] >= g["kernel_ops_before"]
        assert g["fqt_kernels"] == g["kernel_nodes"]
        assert {"qmm_kernel", "qmm_epilogue_kernel"} & set(g["kernel_names"])
        # column-major saved codes keep their memory order through the trace
        assert g["strides_same"]
        # a measured provider where one applies: here the Triton GEMM wins (the stand-in
        # measurement's default), and the table says by how much against bf16
        assert all(k.startswith("triton qmm") for k in g["kernels"])
    if case == "int8:auto":
        assert any(k.startswith("triton qmm, measured 3.00x bf16") for g in graphs for k in g["kernels"])


ATTN_CASES = ["attn/int8:auto", "attn/psq8:off"]


@pytest.fixture(scope="module")
def attn_cuda_steps() -> dict:
    """The same for a GPT block (attention as two batched GEMMs of activations)."""
    return _fake_cuda_steps(ATTN_CASES)


@pytest.mark.parametrize("case", ATTN_CASES)
def test_cuda_attention_bmm_is_a_batched_triton_gemm_inductor_launches(attn_cuda_steps, case):
    """Attention's batched GEMMs (forward, grad_lhs, grad_rhs) run on the batched Triton GEMM,
    launched by Inductor like every other fqt kernel: no fqt op is left as a Python call."""
    graphs = attn_cuda_steps[case]
    batched = [k for g in graphs for k in g["kernels"] if k.startswith("triton qbmm")]
    assert len(batched) == 6, [g["kernels"] for g in graphs]  # 2 bmm sites x 3 GEMMs
    for g in graphs:
        assert g["fqt_calls_after"] == [] and g["python_calls"] == []
        assert "qbmm_kernel" in g["kernel_names"] and g["fqt_kernels"] == g["kernel_nodes"]
        assert g["strides_same"]


def test_cpu_graphs_keep_no_fqt_call_and_count_library_gemms():
    """On the CPU under Inductor the int8 GEMMs are ``torch._int_mm`` library calls with the
    quantizers fused around them: no fqt op is left as a Python call, and the report says so."""
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    report = fqt.explain(model, torch.randn(16, 64), recipe="int8", execution="kernels", inductor=True, progress=False)
    launches = [launch for r in report.records for launch in r.launches]
    assert [launch.stage for launch in launches] == ["forward", "backward"]
    assert all(launch.python_calls == () and launch.kernels > 0 for launch in launches)
    assert sum(launch.library for launch in launches) >= 5  # 2 forward + 3 backward _int_mm (x needs no grad: 2)
    table = report.launch_table()
    assert "fqt Python calls" in table and "library calls" in table
    assert "launches per call" in report.render(wide=True)


def test_eager_graphs_report_their_python_calls():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    report = fqt.explain(model, torch.randn(8, 32), recipe="int8", execution="kernels", inductor=False, progress=False)
    launches = [launch for r in report.records for launch in r.launches]
    assert launches and all(launch.python_calls for launch in launches)
    assert all("inductor=False" in why for launch in launches for _, why in launch.python_calls)


def test_source_launches_counts_the_generated_call():
    """Kernels, fqt's among them, and library calls are counted in Inductor's ``call`` only."""
    source = '''
triton_poi_fused_0 = async_compile.triton('triton_poi_fused_0', """...""")
qmm_kernel_0 = async_compile.triton('qmm_kernel', """...""")
def call(args):
    buf0 = empty_strided_cuda((32, 32), (32, 1), torch.int8)
    triton_poi_fused_0.run(arg0_1, buf0, 1024, stream=stream0)
    quantize_rows_kernel_1.run(buf0, buf1, grid=grid(2))
    qmm_kernel_0.run(buf1, buf2, buf3)
    extern_kernels.mm(buf3, arg1_1, out=buf4)
    buf5 = torch.ops.aten._int_mm.default(buf1, buf2)
    cpp_fused_add_2(buf4, buf5)
    return (buf4,)
def benchmark_compiled_module():
    qmm_kernel_0.run(x)
'''
    base = KernelLaunches("forward", fqt_kernel_names=("qmm_kernel", "quantize_rows_kernel"))
    out = source_launches(base, source)
    assert (out.kernels, out.fqt_kernels, out.library) == (4, 2, 2)


def test_dequantizations_are_copied_per_fusing_reader_and_their_codes_are_not():
    """Step 19: each pointwise / reduction reader of ``codes * scale`` gets its own copy (Inductor
    then recomputes it from the 8-bit codes instead of storing it in fp32); the quantizer that
    made the codes stays one node, and a reader that does not fuse keeps the shared one."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fqt_compiler.codegen.inline import rematerialize_dequantizations
    from fqt_compiler.sites import QuantNodeInfo, QuantNodeKind
    from fqt_compiler.specs import GemmKind, TensorRole

    def f(x, s, w):
        codes = (x * 3).round().clamp(-127, 127).to(torch.int8)  # a quantizer's codes
        deq = torch.ops.prims.convert_element_type(codes, torch.float32) * s
        return deq.abs().amax(0), deq / 2, deq.mm(w)

    gm = make_fx(f)(torch.randn(8, 4), torch.rand(8, 1), torch.randn(4, 3))
    # tag the chain as dequant_chain.emit_quantize does: the step finds dequantizations by it
    info = QuantNodeInfo(0, GemmKind.OUTPUT, TensorRole.ACTIVATION, "int8/sym/row/nearest/none", QuantNodeKind.DEQUANTIZE)
    deq = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor and len(n.users) == 3)
    deq.meta["fqt"] = deq.args[0].meta["fqt"] = info
    want = gm(*(args := (torch.randn(8, 4), torch.rand(8, 1), torch.randn(4, 3))))

    def count(target):
        return sum(n.target is target for n in gm.graph.nodes)

    muls, rounds = count(torch.ops.aten.mul.Tensor), count(torch.ops.aten.round.default)
    assert rematerialize_dequantizations(gm) == 1  # abs and div fuse: one extra copy; mm shares the first
    assert count(torch.ops.aten.mul.Tensor) == muls + 1 and count(torch.ops.aten.round.default) == rounds
    for got, expected in zip(gm(*args), want):
        assert torch.equal(got, expected)
