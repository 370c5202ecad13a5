"""GEMM providers chosen by measurement: on a CUDA graph a plain low-bit GEMM goes to the
fastest of fqt's Triton GEMM, ``torch._int_mm`` and ``torch._scaled_mm`` that can take it,
measured once per device and shape and cached on disk.

Checked without a GPU: the graphs a CPU step traced, re-typed for a fake CUDA device, with the
device measurement replaced by one that names the winner (``tests.helpers.fake_cuda_steps``);
the real measurement runs in the GPU tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fqt_compiler.codegen.providers import GemmCase, Provider, candidates
from tests.helpers.sm90 import ROOT

E4, E5, I8, BF16, F32 = torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.bfloat16, torch.float32


def _case(m=64, k=64, n=64, a=I8, b=I8, out=BF16, affine=False, k_major=True):
    return GemmCase(m, k, n, a, b, out, affine, False, k_major)


def test_candidates_follow_the_libraries_constraints():
    assert candidates(_case()) == [Provider.TRITON, Provider.INT_MM]
    assert candidates(_case(affine=True)) == [Provider.TRITON, Provider.INT_MM]  # corrections in the aten epilogue
    assert candidates(_case(m=16)) == [Provider.TRITON]  # _int_mm needs M > 16
    assert candidates(_case(k=60)) == [Provider.TRITON]  # and K, N multiples of 8
    assert candidates(_case(k_major=False)) == [Provider.TRITON]  # cuBLASLt's 8-bit GEMMs read K-major operands
    assert candidates(_case(a=E4, b=E4)) == [Provider.TRITON, Provider.SCALED_MM]
    assert candidates(_case(a=E5, b=E4)) == [Provider.TRITON, Provider.SCALED_MM]  # the fp8 recipe's backward
    assert candidates(_case(a=E5, b=E5)) == [Provider.TRITON]
    assert candidates(_case(a=E4, b=E4, out=F32)) == [Provider.TRITON]  # row-wise scaling writes bf16
    assert candidates(_case(a=E4, b=E4, n=72)) == [Provider.TRITON]  # N a multiple of 16
    assert candidates(_case(a=E4, b=E4, affine=True)) == [Provider.TRITON]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One fresh process over a fake CUDA device: int8 with ``torch._int_mm`` measured fastest,
    the same case again (its timings now on disk), then fp8 in bf16 with ``torch._scaled_mm``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FQT_PROFILE_DIR"] = str(tmp_path_factory.mktemp("profiles"))
    cases = ["int8:auto@torch._int_mm", "int8:auto@torch._int_mm", "fp8:auto:bfloat16@torch._scaled_mm"]
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.fake_cuda_steps", *cases], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"int8": out["cases"][0], "int8 again": out["cases"][1], "fp8": out["cases"][2],
            "measurements": out["measurements"], "dir": env["FQT_PROFILE_DIR"]}


def test_int_mm_measured_fastest_replaces_plain_triton_gemms_and_is_cached(runs):
    from pathlib import Path

    assert runs["measurements"][:2] == [2, 2]  # the forward's plain GEMM and the backward's one with M > 16; then cached
    kernels = [k for g in runs["int8"] for k in g["kernels"]]
    assert sum(k.startswith("torch._int_mm, measured 2.00x triton qmm and 3.00x bf16") for k in kernels) == 2
    for g in runs["int8"]:
        assert g["int_mm_nodes"] == 1 and g["fqt_calls_after"] == []
        assert g["kernel_nodes"] == g["kernel_ops_before"] - 1  # one Triton GEMM fewer
    assert len(list(Path(runs["dir"]).glob("providers_*.json"))) == 1
    assert runs["int8 again"] == runs["int8"]


def test_scaled_mm_for_fp8(runs):
    assert sum(g["scaled_mm_nodes"] for g in runs["fp8"]) == 3
    assert any("torch._scaled_mm (e5m2 x e4m3), measured" in k for g in runs["fp8"] for k in g["kernels"])


@pytest.mark.gpu
def test_gpu_providers_are_measured_and_numbers_agree(tmp_path, monkeypatch):
    """On a GPU: a step with int8 GEMMs measures its providers once, and whichever wins, the
    loss is the reference step's within stochastic-rounding noise."""
    import fqt_compiler as fqt

    monkeypatch.setenv("FQT_PROFILE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024)).cuda()
    x = torch.randn(8, 256, 1024, device="cuda")
    be = fqt.backend(recipe="int8")
    loss = torch.compile(model, backend=be)(x).square().mean()
    loss.backward()
    assert list(tmp_path.glob("providers_*.json"))
    kernels = [g.kernel for r in be.records for s in r.decisions for g in s.gemms]
    assert any(", measured" in k for k in kernels), kernels
    torch._dynamo.reset()
    ref = torch.compile(model, backend=fqt.backend(recipe="int8", execution="reference"))(x).square().mean()
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item())
