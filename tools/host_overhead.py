"""Host time of fqt's kernel ops per call, with the Triton launches themselves mocked out.

``python -m fqt_compiler.tools.host_overhead`` times what an ``fqt::`` op costs the CPU each
time it is called eagerly -- the op's dispatch, its launcher's checks, allocations and small
torch ops, Triton's argument binding up to the launch -- on CPU tensors under Triton's
interpreter with every kernel launch replaced by a no-op: what a GPU step pays on the host
per op when a graph calls the ops as Python functions (``inductor=False``, or an op left a
Python call). Under Inductor on CUDA, the ``inline_kernel_launches`` step traces these
launchers once at compile time, and none of this runs per call: Inductor's generated code
launches the kernels itself.

Shapes are a GPT-2-small MLP's first Linear at 2048 tokens (2048 x 768 -> 3072).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

__all__ = ["measure", "main"]


def _mock_launches() -> None:
    """Every Triton kernel launch (jit functions, autotuners, the interpreter's) a no-op."""
    import triton.runtime.jit as jit
    from triton.runtime.interpreter import InterpretedFunction

    def no_launch(self, grid):
        return lambda *args, **kwargs: None

    jit.KernelInterface.__getitem__ = no_launch
    InterpretedFunction.__getitem__ = no_launch


def _time(fn: Callable[[], object], reps: int) -> float:
    """Median microseconds per call of ``fn`` over ``reps`` calls (after warm-up calls)."""
    for _ in range(5):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def measure(reps: int = 200) -> list[tuple[str, float]]:
    """(what, median host microseconds per call) for the ops a quantized Linear calls."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("host_overhead needs TRITON_INTERPRET=1 (its ops take CPU tensors); `main` sets it")
    import torch

    import fqt_compiler as fqt
    from fqt_compiler.codegen.kernels.qmm import qmm
    from fqt_compiler.codegen.kernels.quantize import quantize
    from fqt_compiler.grid import QOperand

    _mock_launches()
    tokens, d_in, d_out = 2048, 768, 3072
    x = torch.randn(tokens, d_in)
    codes_a = torch.randint(-127, 128, (tokens, d_in), dtype=torch.int8)
    codes_b = torch.randint(-127, 128, (d_out, d_in), dtype=torch.int8).t()
    sa, sb = torch.rand(tokens, 1), torch.rand(1, d_out)
    bias = torch.randn(d_out)
    row = fqt.QuantSpec(granularity="row").key()
    tensor = fqt.QuantSpec(granularity="tensor").key()
    stochastic = fqt.QuantSpec(granularity="row", rounding="stochastic").key()
    ops = torch.ops.fqt
    cases = [
        # fqt::qmm takes its CPU path on CPU tensors (torch._int_mm): its launcher, without the op's dispatch
        ("qmm launcher int8 (2048x768 @ 768x3072, bias)",
         lambda: qmm(QOperand(codes_a, sa), QOperand(codes_b, sb), bias, torch.bfloat16)),
        ("quantize launcher per-row int8 (2048x768)", lambda: quantize(x, fqt.QuantSpec(granularity="row"))),
        ("fqt::quantize_kernel per-row int8 (2048x768)", lambda: ops.quantize_kernel(x, row, 0)),
        ("fqt::quantize_kernel per-tensor int8 (2048x768)", lambda: ops.quantize_kernel(x, tensor, 0)),
        ("fqt::quantize_kernel per-row stochastic (2048x768)", lambda: ops.quantize_kernel(x, stochastic, 0)),
    ]
    return [(name, _time(fn, reps)) for name, fn in cases]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"  # read when Triton's kernels are defined: before any fqt kernel import
    from tabulate import tabulate

    rows = measure(args.reps)
    print(tabulate([(name, f"{us:.1f}") for name, us in rows], headers=["op (launch mocked)", "host µs / call"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
