"""Compiling Triton kernels for sm_90 (an H100/H200) without a GPU, and graphs traced for CUDA
on a machine without one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import fx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_without_interpreter(script: str) -> str:
    """Run ``script`` (which compiles kernels for sm_90) in a subprocess without Triton's
    interpreter; its stdout. Skips where this Triton install has no ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode and "ptxas" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def as_cuda_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose tensor values (``meta["val"]``) sit on a fake CUDA device: what
    the backend would hand codegen for a model on a GPU, built without one (nothing runs)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()
    new_graph = fx.Graph()
    env: dict = {}
    for node in gm.graph.nodes:
        env[node] = new_graph.node_copy(node, lambda n: env[n])
        env[node].meta = dict(node.meta)
        env[node].meta["val"] = _to_cuda(node.meta.get("val"), mode, FakeTensor)
    return fx.GraphModule(gm, new_graph)


def _to_cuda(val, mode, fake_cls):
    if isinstance(val, torch.Tensor):
        meta = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
        return fake_cls(mode, meta, torch.device("cuda", 0))
    if isinstance(val, (tuple, list)):
        return type(val)(_to_cuda(v, mode, fake_cls) for v in val)
    return val
