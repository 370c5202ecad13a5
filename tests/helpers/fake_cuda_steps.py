"""Run the compile steps on graphs re-typed for a fake CUDA device, as the backend runs them on
a GPU, and report what the graph handed to Inductor holds (JSON on stdout).

Run as ``python -m tests.helpers.fake_cuda_steps [MODEL/]RECIPE:FUSION[:DTYPE][@PROVIDER] ...`` in a process without
Triton's interpreter: the traced launches need the kernels as the GPU sees them (compiled
``@triton.jit`` functions, not interpreted ones). A CPU training step traces the graphs;
nothing runs or compiles for the device. ``@PROVIDER``: the GEMM provider the (fake) device
measurement says is fastest for that case (default: the Triton GEMM); the output also counts
the measurements made (``"measurements"``, after each case: the cache on disk saves the rest).
``MODEL/``: ``mlp`` (the default), ``conv`` (strided, grouped, 1-D and channels-last 1x1
convolutions), ``attn`` (a GPT block: attention's batched GEMMs) or ``resnet`` (a narrow
ResNet-50 in channels-last memory)."""

from __future__ import annotations

import json
import logging
import sys

import torch
from torch import nn

import fqt_compiler as fqt
from fqt_compiler import pipeline
from fqt_compiler.codegen.launches import fqt_calls, graph_launches, kernel_nodes
from fqt_compiler.config import FQTConfig
from fqt_compiler.ops import TRITON_LAUNCHES
from tests.helpers.sm90 import FakeCudaMethods, as_cuda_graph


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False)
        self.c3 = nn.Conv1d(16, 8, 3, padding=1, bias=False)
        self.pointwise = nn.Conv2d(16, 16, 1, bias=False)  # channels-last: a 1x1 weight's size-1 dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        h = self.pointwise(h.contiguous(memory_format=torch.channels_last))
        return self.c3(h.flatten(2))


def _model(name: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    if name == "resnet":  # the conv stage's network, narrow and shallow: bottlenecks, strided 1x1s
        from fqt_compiler.tools.cnn_models import ResNet50

        model = ResNet50(width=8, blocks=(1, 1, 1, 1)).to(dtype).to(memory_format=torch.channels_last)
        return model, torch.randn(2, 3, 16, 16, dtype=dtype).to(memory_format=torch.channels_last)
    if name == "attn":  # a transformer block whose attention is two bmm's of activations
        from tests.helpers.models import GPTBlock

        return GPTBlock(d=16).to(dtype), torch.randint(0, 16, (2, 6))
    if name == "conv":
        model = _Convs().to(dtype)
        model.pointwise.to(memory_format=torch.channels_last)
        return model, torch.randn(2, 3, 8, 8, dtype=dtype)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).to(dtype), torch.randn(4, 8, 32, dtype=dtype)


def _graphs(recipe: str, dtype: torch.dtype = torch.float32, model_name: str = "mlp") -> list:
    graphs = []
    real = pipeline.compile_partitioned

    def spy(gm, ctx):
        graphs.append((as_cuda_graph(gm), ctx.stage, ctx.saved))
        return real(gm, ctx)

    pipeline.compile_partitioned = spy
    try:
        model, x = _model(model_name, dtype)
        torch.compile(model, backend=fqt.backend(recipe=recipe, inductor=False))(x).float().square().mean().backward()
    finally:
        pipeline.compile_partitioned = real
    return graphs


def _steps(gm, stage, saved, options: dict):
    ctx = pipeline.GraphContext(FQTConfig.from_options(options), stage, 0, example_inputs=[], saved=saved)
    with FakeCudaMethods():
        pipeline.run_steps(gm, ctx)
    return ctx


def _output_strides(gm) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    vals = [o.meta.get("val") for o in out if isinstance(o, torch.fx.Node)]
    # a size-1 dim's stride addresses nothing (a 1x1 convolution's channels-last weight)
    return [[st if n > 1 else None for n, st in zip(v.shape, v.stride())] for v in vals if isinstance(v, torch.Tensor)]


def case(recipe: str, fusion: str, dtype: torch.dtype = torch.float32, model: str = "mlp") -> list[dict]:
    """Per graph: the fqt kernel ops without Inductor, and what is left with it."""
    out = []
    for gm, stage, saved in _graphs(recipe, dtype, model):
        eager = as_cuda_graph(gm)
        _steps(eager, stage, saved, {"recipe": recipe, "fusion": fusion, "inductor": False})
        strides = _output_strides(eager)
        ctx = _steps(gm, stage, saved, {"recipe": recipe, "fusion": fusion, "inductor": True})
        gm.graph.lint()
        launches = graph_launches(stage.value, gm, ctx.python_calls, inductor=True)
        out.append({
            "stage": stage.value,
            "ran": list(ctx.ran),
            "ops_before": [str(n.target) for n in fqt_calls(eager)],
            "kernel_ops_before": sum(n.target in TRITON_LAUNCHES for n in fqt_calls(eager)),
            "fqt_calls_after": [str(n.target) for n in fqt_calls(gm)],
            "python_calls": ctx.python_calls,
            "kernel_nodes": len(kernel_nodes(gm)),
            "fqt_kernels": launches.fqt_kernels,
            "kernel_names": list(launches.fqt_kernel_names),
            "strides_same": _output_strides(gm) == strides,
            "clones": sorted(str(n.meta["val"].dtype) for n in gm.graph.nodes if n.target is torch.ops.aten.clone.default),
            "int_mm_nodes": sum(n.target is torch.ops.aten._int_mm.default for n in gm.graph.nodes),
            "scaled_mm_nodes": sum(n.target is torch.ops.aten._scaled_mm.default for n in gm.graph.nodes),
            "kernels": [lowered.kernel for lowered in ctx.lowered],
        })
    return out


def fake_measure():
    """A device measurement where ``measure.fastest`` wins: 1 ms for it, 2 ms for the other
    providers, 3 ms for bf16; it counts its calls (``measure.calls``)."""
    from fqt_compiler.codegen import providers

    def measure(case, device):
        measure.calls += 1
        out = {p.value: (1e-3 if p.value == measure.fastest else 2e-3) for p in providers.candidates(case)}
        return {**out, providers.HP: 3e-3}

    measure.calls, measure.fastest = 0, "triton qmm"
    return measure


def main(argv: list[str]) -> None:
    from fqt_compiler.codegen import providers

    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # the kernels' tile lists ask for it
    providers.MEASURE = measure = fake_measure()
    # without a GPU torch cannot compile a kernel to see which arguments it writes, assumes all
    # (a GPU machine finds out exactly), and logs a warning per kernel
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    results, counts = [], []
    for item in argv:
        spec, _, fastest = item.partition("@")
        measure.fastest = fastest or "triton qmm"
        model, _, spec = spec.rpartition("/")
        recipe, fusion, *dtype = spec.split(":")
        results.append(case(recipe, fusion, getattr(torch, dtype[0]) if dtype else torch.float32, model or "mlp"))
        counts.append(measure.calls)
    print(json.dumps({"cases": results, "measurements": counts}))


if __name__ == "__main__":
    main(sys.argv[1:])
