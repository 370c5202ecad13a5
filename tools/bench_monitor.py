"""``fqt bench --sections monitor``: what live monitoring costs a training step.

Each model trains twice side by side from the same weights: compiled with ``fqt`` as usual, and
with ``monitor=fqt.Monitor(every=100)``. A block is 100 SGD steps, so every block of the
monitored run contains exactly one monitored step (its graph's call 0, 100, 200, ...). Blocks of
the two runs are timed interleaved (which goes first alternates), and the overhead is the ratio
of the median block times, minus one. The monitored step alone is timed too (the first step of each monitored block). Compile time
is excluded (warm-up blocks first); a monitored compile compiles every graph twice.

The *overhead* reported is the monitored step's extra time over the run's other steps, spread
over the period: what monitoring adds to that run. The block ratio against the separate
unmonitored compile is reported beside it; it also carries whatever differs between two
compilations of the same model on the machine (Inductor's CPU code for the two need not be the
same, and on this kind of machine was not always).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.tools.cnn_models import cnn

__all__ = ["MonitorCost", "bench_monitor", "monitor_section", "MODELS"]

PERIOD = 100


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))


# (name, model factory, input shape, recipe)
MODELS: tuple = (
    ("MLP 4x1024, batch 256", _mlp, (256, 1024), "int8"),
    ("PreAct-ResNet-20, batch 32", lambda: cnn("preact20"), (32, 3, 32, 32), "int8"),
)


@dataclass
class MonitorCost:
    what: str
    recipe: str
    step_ms: float  # unmonitored run, median block / PERIOD
    block_ratio: float  # median monitored block / median unmonitored block
    monitored_step_ms: float  # the sampled step of a monitored block
    plain_step_ms: float  # the other steps of a monitored block, mean
    records: int  # per monitored step


def _runner(base: nn.Module, shape: tuple, recipe: str, monitor: fqt.Monitor | None) -> Callable[[int], list[float]]:
    torch.manual_seed(0)
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step = torch.compile(model, backend=fqt.backend(recipe=recipe, monitor=monitor))
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))

    def block(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(step(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return times

    return block


def bench_monitor(what: str, make: Callable[[], nn.Module], shape: tuple, recipe: str, blocks: int) -> MonitorCost:
    """Interleaved blocks of ``PERIOD`` steps with and without a monitor (see the module docstring)."""
    torch._dynamo.reset()
    base = make()
    mon = fqt.Monitor(every=PERIOD, warn=False)
    plain, watched = _runner(base, shape, recipe, None), _runner(base, shape, recipe, mon)
    plain(PERIOD)  # warm-up: compiles, and lines the monitored run up on its period
    watched(PERIOD)
    off, on, sampled, rest = [], [], [], []
    for k in range(blocks):
        first_off = k % 2 == 0  # alternate which run goes first: a drift in the machine's speed cancels
        if first_off:
            off.append(sum(plain(PERIOD)))
        times = watched(PERIOD)
        on.append(sum(times))
        sampled.append(times[0])
        rest += times[1:]
        if not first_off:
            off.append(sum(plain(PERIOD)))
    per_step = len(mon.records) // (blocks + 1)
    return MonitorCost(what, recipe, 1e3 * statistics.median(off) / PERIOD, statistics.median(on) / statistics.median(off),
                       1e3 * statistics.median(sampled), 1e3 * statistics.mean(rest), per_step)


def monitor_section(shapes, recipes: list[str], device: torch.device, reps: int, dtype) -> list[str]:
    """The ``monitor`` section's markdown (CPU; ``shapes``, ``recipes`` and ``dtype`` belong to the others)."""
    if device.type != "cpu":
        return ["\n## Monitoring cost\n", "measured on the CPU only (fqt bench --device cpu --sections monitor)"]
    blocks = max(3, reps // 2)
    results = []
    for what, make, shape, recipe in MODELS:
        results.append(bench_monitor(what, make, shape, recipe, blocks))
        print(f"  monitor {results[-1]}", flush=True)
    rows = [[r.what, r.recipe, f"{r.plain_step_ms:.1f}", f"{r.monitored_step_ms:.0f}",
             f"{100 * (r.monitored_step_ms - r.plain_step_ms) / (PERIOD * r.plain_step_ms):+.1f}%", f"{r.step_ms:.1f}",
             f"{100 * (r.block_ratio - 1):+.1f}%", r.records] for r in results]
    head = ["model", "recipe", "step ms", "monitored step ms", f"overhead, period {PERIOD}",
            "step ms, separate unmonitored compile", "block time vs that compile", "records per monitored step"]
    return [f"\n## Monitoring cost: period {PERIOD}, median of {blocks} interleaved blocks of {PERIOD} SGD steps\n",
            tabulate(rows, headers=head, tablefmt="github")]
