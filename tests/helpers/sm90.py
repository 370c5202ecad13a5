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


class FakeCudaMethods:
    """A torch-function mode for tracing on fake CUDA tensors in a CPU-only build of torch.

    A few ``Tensor`` methods (``contiguous``, ``copy_``, indexing, index assignment) take a CUDA device guard in
    their Python binding, which a build without CUDA cannot make, before any dispatch (a fake
    tensor never gets to say it is fake). This mode sends them to their aten operators instead,
    which reach the fake tensor mode without a guard: indexing by one tensor, or by ints and
    slices, which is what fqt's launchers and torch's decompositions use. On a machine with
    CUDA it changes nothing."""

    def __new__(cls):
        from torch.overrides import TorchFunctionMode

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.Tensor.contiguous and len(args) == 1:
                    x, fmt = args[0], kwargs.get("memory_format", torch.contiguous_format)
                    return x if x.is_contiguous(memory_format=fmt) else torch.ops.aten.clone.default(x, memory_format=fmt)
                if func is torch.Tensor.copy_ and not kwargs and len(args) == 2:
                    return torch.ops.aten.copy_.default(*args)
                if func is torch.Tensor.__getitem__ and len(args) == 2:
                    out = _getitem(*args)
                    if out is not None:
                        return out
                if func is torch.Tensor.__setitem__ and len(args) == 3 and isinstance(args[2], torch.Tensor):
                    view = _getitem(args[0], args[1])  # a strided convolution's dgrad spreads its gradient
                    if view is not None:
                        torch.ops.aten.copy_.default(view, args[2])
                        return None
                return func(*args, **kwargs)

        return _Mode()


def _getitem(x: torch.Tensor, index) -> torch.Tensor | None:
    """``x[index]`` through aten ops, for ints and slices, or one tensor index after full
    slices; else None."""
    items = index if isinstance(index, tuple) else (index,)
    if items and isinstance(items[-1], torch.Tensor) and all(i == slice(None) for i in items[:-1]):
        return torch.ops.aten.index.Tensor(x, [None] * (len(items) - 1) + [items[-1]])
    if not all(isinstance(i, (int, slice)) for i in items):
        return None
    dim = 0
    for i in items:
        if isinstance(i, int):
            x = torch.ops.aten.select.int(x, dim, i)
        else:
            start, stop, step = i.indices(x.shape[dim])
            x = torch.ops.aten.slice.Tensor(x, dim, start, stop, step)
            dim += 1
    return x
