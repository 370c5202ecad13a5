"""``fqt bench --sections conv``: convolutions, the paper's own workload.

Two tables, every number a ratio against baselines timed beside the candidate in the same
process (interleaved repetitions, medians):

* one convolution layer (no bias), forward + backward with a given grad_output, at ResNet
  shapes;
* a whole training step (forward, cross-entropy, backward, SGD with momentum) of the CIFAR
  networks of ``cnn_models`` at 32x32.

Baselines, all under ``torch.compile``: fp32 in the default (NCHW) layout, fp32 channels-last,
and on a CPU with bf16 units (AVX-512 BF16 / AMX) bf16 autocast channels-last, what a user
picks instead of fp32 there. The fqt candidate runs channels-last too (oneDNN's convolutions
read and write NHWC; an NCHW model pays a layout copy around every convolution).
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.tools.timing import cpu_bf16_units, interleaved_times, spread
from fqt_compiler.tools.cnn_models import cnn

__all__ = ["CONV_LAYERS", "NETWORKS", "ConvResult", "bench_conv_layer", "bench_network", "conv_section"]

# (batch, in channels, out channels, image size, kernel, stride): ResNet-50 / ResNet-18 stages
CONV_LAYERS = [(32, 64, 64, 56, 3, 1), (32, 128, 128, 28, 3, 1), (32, 256, 256, 14, 3, 1), (32, 512, 512, 7, 3, 1),
               (32, 256, 1024, 14, 1, 1), (32, 128, 256, 28, 3, 2)]
NETWORKS = [("resnet18", 128), ("preact20", 128), ("preact56", 128)]


@dataclass
class ConvResult:
    what: str
    recipe: str
    ms: dict[str, float] = field(default_factory=dict)  # baseline / candidate name -> median ms
    spread: str = ""
    lowbit: int = 0
    gemms: int = 0


def _baselines(device: torch.device) -> list[tuple[str, bool, bool]]:
    """(name, channels-last, bf16 autocast) of each baseline this device gets."""
    out = [("fp32", False, False), ("fp32 channels-last", True, False)]
    if device.type == "cuda" or cpu_bf16_units():
        out.append(("bf16 channels-last", True, True))
    return out


def _layout(t: torch.Tensor | nn.Module, channels_last: bool):
    return t.to(memory_format=torch.channels_last) if channels_last else t


def _lowbit(be) -> tuple[int, int]:
    gemms = [g for r in be.records for s in r.decisions for g in s.gemms]
    return sum(g.status is fqt.GemmStatus.LOWBIT_KERNEL for g in gemms), len(gemms)


def _time(fns: dict[str, Callable[[], None]], device: torch.device, reps: int) -> tuple[dict[str, float], list[float]]:
    names = list(fns)
    times = interleaved_times([fns[n] for n in names], device, reps)
    return {n: 1e3 * statistics.median(t) for n, t in zip(names, times)}, times[-1]


def bench_conv_layer(layer: tuple, recipes: list[str], device: torch.device, reps: int) -> list[ConvResult]:
    """fwd+bwd of one Conv2d (no bias) per recipe against the baselines."""
    n, c, k, size, r, stride = layer
    torch.manual_seed(0)
    conv = nn.Conv2d(c, k, r, stride=stride, padding=r // 2, bias=False).to(device)
    x = torch.randn(n, c, size, size, device=device)
    grad = torch.randn(conv(x).shape, device=device)

    def step(model: nn.Module, channels_last: bool, autocast: bool) -> Callable[[], None]:
        xs, g = _layout(x, channels_last).requires_grad_(), _layout(grad, channels_last)

        def run():
            xs.grad = None
            model.weight.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                y = model(xs)
            y.backward(g.to(y.dtype))

        return run

    torch._dynamo.reset()
    fns = {name: step(torch.compile(_layout(copy.deepcopy(conv), cl)), cl, ac) for name, cl, ac in _baselines(device)}
    results = []
    for recipe in recipes:
        be = fqt.backend(recipe=recipe)
        fns_r = {**fns, "fqt": step(torch.compile(_layout(copy.deepcopy(conv), True), backend=be), True, False)}
        ms, cand = _time(fns_r, device, reps)
        res = ConvResult(f"{c}->{k}, {r}x{r}/{stride}, {size}x{size}, N={n}", recipe, ms, spread(cand, ms["fp32"] / 1e3))
        res.lowbit, res.gemms = _lowbit(be)
        results.append(res)
    return results


def bench_network(name: str, batch: int, recipes: list[str], device: torch.device, reps: int) -> list[ConvResult]:
    """One SGD training step of a CIFAR network per recipe against the baselines."""
    torch.manual_seed(0)
    base = cnn(name).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(channels_last: bool, autocast: bool, backend=None) -> Callable[[], None]:
        model = _layout(copy.deepcopy(base), channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        compiled = torch.compile(model, backend=backend) if backend is not None else torch.compile(model)
        xs = _layout(x, channels_last)

        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(compiled(xs), y)
            loss.backward()
            opt.step()

        return run

    torch._dynamo.reset()
    fns = {n: step(cl, ac) for n, cl, ac in _baselines(device)}
    results = []
    for recipe in recipes:
        be = fqt.backend(recipe=recipe)
        ms, cand = _time({**fns, "fqt": step(True, False, be)}, device, reps)
        res = ConvResult(f"{name}, batch {batch}", recipe, ms, spread(cand, ms["fp32"] / 1e3))
        res.lowbit, res.gemms = _lowbit(be)
        results.append(res)
    return results


def _rows(results: list[ConvResult], names: list[str]) -> list[list]:
    rows = []
    for r in results:
        ratios = [f"{r.ms[n] / r.ms['fqt']:.2f}x" for n in names]
        rows.append([r.what, r.recipe, *ratios, r.spread, *(f"{r.ms[n]:.1f}" for n in [*names, "fqt"]), f"{r.lowbit}/{r.gemms}"])
    return rows


def conv_section(shapes, recipes: list[str], device: torch.device, reps: int, dtype) -> list[str]:
    """The ``conv`` section's markdown (``shapes`` and ``dtype`` belong to the other sections)."""
    names = [n for n, _, _ in _baselines(device)]
    headers = lambda first: [first, "recipe", *(f"vs {n}" for n in names), "range vs fp32",  # noqa: E731
                             *(f"{n} ms" for n in names), "fqt ms", "low-bit GEMMs"]
    layer_results = []
    for layer in CONV_LAYERS:
        layer_results += bench_conv_layer(layer, recipes, device, reps)
        print(f"  conv layer {_rows(layer_results[-len(recipes):], names)}", flush=True)
    net_results = []
    for name, batch in NETWORKS:
        net_results += bench_network(name, batch, recipes, device, max(3, reps // 2))
        print(f"  conv network {_rows(net_results[-len(recipes):], names)}", flush=True)
    parts = [f"\n## Convolutions: one layer, fwd+bwd (median of {reps} interleaved)\n",
             "fqt runs channels-last; every baseline is torch.compile.\n",
             tabulate(_rows(layer_results, names), headers=headers("conv layer"), tablefmt="github"),
             f"\n## Convolutional networks: one SGD training step at 32x32 (median of {max(3, reps // 2)} interleaved)\n",
             tabulate(_rows(net_results, names), headers=headers("network"), tablefmt="github")]
    return parts
