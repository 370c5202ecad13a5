"""Timing for the benchmarks: interleaved repetitions (fair on a noisy machine), CUDA events
on a GPU (after a head start for the host: device time, not launch overhead, for calls under
about a millisecond of host time), and what a result's spread and the CPU's bf16 units are."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from fqt_compiler.measured import cpu_flags

__all__ = ["interleaved_medians", "interleaved_times", "spread", "cpu_bf16_units"]


# about 1 ms of a GPU clock near 2 GHz: longer than any fqt launcher's host time
_HOST_HEAD_START_CYCLES = 2_000_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: list[Callable[[], object]], device: torch.device, reps: int, warmup: int = 2) -> list[float]:
    """Median seconds of each function, timed in interleaved rounds (fair on a noisy machine)."""
    return [statistics.median(t) for t in interleaved_times(fns, device, reps, warmup)]


def interleaved_times(fns: list[Callable[[], object]], device: torch.device, reps: int, warmup: int = 2) -> list[list[float]]:
    """Every timed repetition (seconds) of each function, timed in interleaved rounds."""
    for _ in range(warmup):
        for f in fns:
            f()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                # The device spins while the host issues the call: the events then time the
                # device's work, not a Python launcher's issue time (recorded right after a
                # synchronize, the device idled while the host issued); a step's host time
                # past the spin still counts.
                torch.cuda._sleep(_HOST_HEAD_START_CYCLES)
                start.record()
                f()
                end.record()
                torch.cuda.synchronize(device)
                times[i].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                f()
                times[i].append(time.perf_counter() - t0)
    return times


def spread(samples: list[float], baseline: float) -> str:
    """The fastest and slowest of ``samples`` as ratios to ``baseline`` seconds ("1.10-1.32x"):
    a step time that varies shows here, where a median hides it."""
    return f"{baseline / max(samples):.2f}-{baseline / min(samples):.2f}x"


def cpu_bf16_units() -> bool | None:
    """Whether this CPU has bf16 arithmetic (AVX-512 BF16 or AMX BF16), from /proc/cpuinfo;
    None where that cannot be read (not Linux)."""
    flags = cpu_flags()
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & flags)
