"""Code generation: turn a rewritten, partitioned graph into something callable.

* ``Mode.REFERENCE``: run the graph eagerly with the reference ops of ``fqt_compiler.ops``
  (quantization *simulated*: dequantize, then a high-precision GEMM).
* ``Mode.KERNELS``: ``lower.lower_gemms`` replaces every realizable quantized GEMM by a
  low-bit kernel (``fqt::qmm``: Triton on CUDA, ``torch._int_mm`` on CPU); stochastic and
  nearest quantizations on CUDA run the Triton quantize kernel; the rest of the graph is
  compiled by Inductor (``inductor=True``) or run eagerly.
"""

from __future__ import annotations

from typing import Callable

from torch import fx
from torch._functorch.aot_autograd import make_boxed_func

from fqt_compiler.config import FQTConfig, Mode

from . import ops as _ops  # registers fqt::qmm and fqt::quantize_kernel
from .lower import LoweredGemm, lower_gemms

__all__ = ["compile_graph", "LoweredGemm", "lower_gemms"]
del _ops


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: FQTConfig) -> tuple[Callable, list[LoweredGemm]]:
    """Return a boxed callable running ``gm`` in ``config.mode`` and the lowering decisions."""
    lowered: list[LoweredGemm] = []
    if config.mode is Mode.KERNELS:
        lowered = lower_gemms(gm)
        if config.inductor:
            from torch._inductor.compile_fx import compile_fx_inner

            return compile_fx_inner(gm, example_inputs), lowered
    return make_boxed_func(gm.forward), lowered
