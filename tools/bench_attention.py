"""``fqt bench --sections attention``: attention's batched GEMMs under fqt.

The attention core ``softmax(Q Kᵀ / sqrt(d)) V`` written with ``torch.matmul`` (two ``bmm``
sites of activations, six GEMMs with the backward), Q, K and V requiring grad, fwd+bwd under
``torch.compile``: per recipe against high precision timed beside it (fp32 on a CPU, and bf16
autocast where the CPU has bf16 units; bf16 on a GPU). The low-bit GEMM column counts the
GEMMs that ran on ``fqt::qbmm``.
"""

from __future__ import annotations

import math
import statistics

import torch
from tabulate import tabulate
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.tools.timing import cpu_bf16_units, interleaved_times, spread

__all__ = ["Attention", "attention_section", "CPU_SHAPES", "GPU_SHAPES"]

# (batch, heads, sequence, head dim)
CPU_SHAPES = [(4, 4, 256, 64), (2, 8, 512, 64)]
GPU_SHAPES = [(8, 12, 1024, 64), (4, 16, 2048, 128)]


class Attention(nn.Module):
    """The attention core, as eager-attention model code writes it."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        att = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return torch.matmul(att.softmax(dim=-1), v)


def _step(model, inputs, autocast: bool = False):
    def run():
        for t in inputs:
            t.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = model(*inputs)
        out.float().square().mean().backward()
    return run


def bench_attention(shape, recipes, device, reps, dtype) -> list[list]:
    """One table row per recipe: the shape, the recipe, speed-up and spread against the
    high-precision baseline, the bf16-autocast ratio (CPUs with bf16 units), times, low-bit GEMMs."""
    torch.manual_seed(0)
    inputs = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    torch._dynamo.reset()
    baselines = [_step(torch.compile(Attention()), inputs)]
    bf16 = device.type == "cpu" and cpu_bf16_units()
    if bf16:
        baselines.append(_step(torch.compile(Attention()), inputs, autocast=True))
    rows = []
    for name in recipes:
        be = fqt.backend(recipe=name)
        candidate = _step(torch.compile(Attention(), backend=be), inputs)
        times = interleaved_times([*baselines, candidate], device, reps)
        t_base, t_cand = statistics.median(times[0]), statistics.median(times[-1])
        lowbit = sum(g.status is fqt.GemmStatus.LOWBIT_KERNEL for r in be.records for s in r.decisions for g in s.gemms)
        row = ["x".join(map(str, shape)), name, f"{t_base / t_cand:.2f}x", spread(times[-1], t_base)]
        if bf16:
            row.append(f"{statistics.median(times[1]) / t_cand:.2f}x")
        rows.append(row + [f"{t_base * 1e3:.1f}", f"{t_cand * 1e3:.1f}", lowbit])
        print(f"  attention {rows[-1]}", flush=True)
    return rows


def attention_section(shapes: list, recipes: list[str], device: torch.device, reps: int, dtype: torch.dtype) -> list[str]:
    """The ``attention`` section's markdown (its own shapes: batch x heads x sequence x head dim)."""
    rows = []
    for shape in GPU_SHAPES if device.type == "cuda" else CPU_SHAPES:
        rows += bench_attention(shape, recipes, device, reps, dtype)
    base = "fp32" if device.type == "cpu" else "bf16"
    bf16 = device.type == "cpu" and cpu_bf16_units()
    headers = ["B x H x T x D", "recipe", f"vs {base}", f"range vs {base}"] + (["vs bf16 autocast"] if bf16 else [])
    return [
        f"\n## Attention core fwd+bwd (two batched GEMMs), vs {base} torch.compile (median of {reps} interleaved)\n",
        tabulate(rows, headers=headers + [f"{base} ms", "fqt ms", "low-bit GEMMs"], tablefmt="github"),
    ]
