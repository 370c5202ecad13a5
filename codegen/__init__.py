"""Code generation: turn a rewritten (partitioned) graph into something callable.

This is the seam between the passes and execution. ``Mode.REFERENCE`` runs the graph eagerly
with the reference ops of ``fqt_compiler.ops`` (quantization *simulated*: dequantize, then a
high-precision GEMM). Lowered low-bit kernels plug in here as further modes.
"""

from __future__ import annotations

from typing import Callable

from torch import fx
from torch._functorch.aot_autograd import make_boxed_func

from fqt_compiler.config import FQTConfig, Mode
from fqt_compiler.errors import OptionsError

__all__ = ["compile_graph"]


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: FQTConfig) -> Callable:
    """Return a boxed callable running ``gm`` in ``config.mode``."""
    if config.mode is Mode.REFERENCE:
        return make_boxed_func(gm.forward)
    raise OptionsError(f"execution mode {config.mode!r} has no code generator; available: {[m.value for m in Mode]}")
