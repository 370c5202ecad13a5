"""``fqt calibrate``: measure this CPU's cost-model profile and save it.

The cost model behind ``never_slower=True`` ships one CPU profile, measured on another
machine; CPUs differ by several times in their bf16 and int8 GEMM throughput (AMX against
AVX-512 alone) and in memory bandwidth. This command times, on this machine and its thread
count: the fp32, bf16 (where the CPU has bf16 units) and int8 (the int8 GEMM fqt runs on this
CPU: ``torch._int_mm``, or its exact sums on fp32 units where that is faster) GEMMs at one
square size, a tensor copy, and the Inductor-compiled quantizer kernels mode runs on the CPU
(stochastic per-row int8, and BHQ's cost in units of it). The profile is saved where
``cost.profile_for`` finds it for this CPU from then on (``fqt_compiler.measured``).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fqt_compiler.int8_gemm import int8_gemm_name, int8_mm
from fqt_compiler.measured import cpu_name, save_fields
from fqt_compiler.tools.timing import cpu_bf16_units, interleaved_times

__all__ = ["measure_cpu_fields", "main"]


def _median_s(fn, reps: int) -> float:
    return statistics.median(interleaved_times([fn], torch.device("cpu"), reps)[0])


def _gemm_flops(size: int, reps: int) -> dict[str, float]:
    """fp32, bf16 and int8 GEMM throughputs (FLOP/s) at ``size``^3; bf16 0 without bf16 units."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    qa = torch.randint(-127, 128, (size, size), generator=g, dtype=torch.int8)
    qb = torch.randint(-127, 128, (size, size), generator=g, dtype=torch.int8).t()  # K-major, as fqt writes codes
    flops = 2.0 * size**3
    out = {"hp_flops": flops / _median_s(lambda: a @ b, reps),
           "lowbit_flops": flops / _median_s(lambda: int8_mm(qa, qb), reps)}
    if cpu_bf16_units():
        ab, bb = a.bfloat16(), b.bfloat16()
        out["bf16_flops"] = flops / _median_s(lambda: ab @ bb, reps)
    else:
        out["bf16_flops"] = 0.0
    return out


def _bandwidths(rows: int, cols: int, reps: int) -> dict[str, float]:
    """Copy bandwidth, and the compiled stochastic row quantizer's bytes moved per second and
    BHQ's time in units of it (bytes/s)."""
    from fqt_compiler.bhq import bhq_quantize_ref
    from fqt_compiler.layout import Layout
    from fqt_compiler.reference import quantize_ref
    from fqt_compiler.specs import QuantSpec

    x = torch.randn(rows, cols)
    y = torch.empty_like(x)
    row = QuantSpec(granularity="row", rounding="stochastic")
    bhq = QuantSpec(granularity="row", rounding="stochastic", transform="bhq")
    quant = torch.compile(lambda t: quantize_ref(t, row, Layout.PENULTIMATE), dynamic=False)
    bhq_quant = torch.compile(lambda t: bhq_quantize_ref(t, bhq, Layout.PENULTIMATE), dynamic=False)
    moved = x.numel() * (x.element_size() + 1)
    t_copy, t_q, t_bhq = (_median_s(f, reps) for f in (lambda: y.copy_(x), lambda: quant(x), lambda: bhq_quant(x)))
    return {"mem_bw": 2 * x.numel() * x.element_size() / t_copy, "quant_bw": moved / t_q, "bhq_passes": t_bhq / t_q}


def measure_cpu_fields(size: int = 2048, reps: int = 7) -> dict:
    """This CPU's ``cost.DeviceProfile`` fields, measured."""
    fields = {**_gemm_flops(size, reps), **_bandwidths(4 * size, size // 2, reps)}
    name = cpu_name()
    bf16 = f", bf16 {fields['bf16_flops'] / 1e12:.2f}" if fields["bf16_flops"] else ", no bf16 units"
    return dict(
        name=f"{name} (measured by fqt calibrate)", efficiency=1.0, fp8_gemm=False, **fields,
        source=f"fqt calibrate, torch {torch.__version__}: {size}^3 GEMMs (TFLOPS fp32 {fields['hp_flops'] / 1e12:.2f}{bf16}, "
        f"int8 {fields['lowbit_flops'] / 1e12:.2f} on {int8_gemm_name()}), copy and Inductor-compiled stochastic row / BHQ "
        "quantizers",
    )


def main(args: argparse.Namespace) -> int:
    fields = measure_cpu_fields(args.size, args.reps)
    for key in ("hp_flops", "bf16_flops", "lowbit_flops"):
        print(f"{key:13s} {fields[key] / 1e12:8.3f} TFLOP/s")
    for key in ("mem_bw", "quant_bw"):
        print(f"{key:13s} {fields[key] / 1e9:8.2f} GB/s")
    print(f"{'bhq_passes':13s} {fields['bhq_passes']:8.2f} row quantizes")
    path = save_fields(cpu_name(), fields)
    print(f"saved to {path}: never_slower uses it on this CPU ({cpu_name()}) from now on")
    return 0
