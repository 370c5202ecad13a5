"""How every fqt launcher starts a Triton kernel: directly, or as a node Inductor launches.

A launcher (``qmm``, ``quantize``, ``fused_quantize``...) is plain Python around one or more
kernels: it checks its inputs, allocates its outputs with torch, and calls :func:`launch`.

* Called eagerly (the ``fqt::`` ops' bodies, the interpreter tests), :func:`launch` runs the
  kernel at once, compiled without FMA contraction so that every epilogue rounds like its
  reference.
* Traced inside :func:`traced_launches` (the ``inline_kernel_launches`` step, on graphs
  Inductor compiles for CUDA), it goes through ``torch.library.wrap_triton``: the trace then
  holds Inductor's Triton-kernel node instead of an opaque op, and the allocations and small
  torch ops around it become ordinary graph nodes. Inductor launches the kernel from its own
  generated code -- no Python per call, buffers planned with the rest of the graph, and a
  step CUDA graphs can capture. Inductor compiles such kernels with Triton's default options,
  which contract multiply-adds into FMAs: the GEMM epilogues, the fused pointwise chains and
  BHQ's transform may then differ from their reference in the last bit. The plain quantize
  kernel's arithmetic has no rounded product feeding an add, so its codes do not.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

__all__ = ["launch", "traced_launches", "tracing_launches"]

_TRACING: contextvars.ContextVar[bool] = contextvars.ContextVar("fqt_traced_launches", default=False)


@contextlib.contextmanager
def traced_launches():
    """Within this block, :func:`launch` records kernels for a trace instead of running them."""
    token = _TRACING.set(True)
    try:
        yield
    finally:
        _TRACING.reset(token)


def tracing_launches() -> bool:
    """Whether launches are being traced (see :func:`traced_launches`)."""
    return _TRACING.get()


def launch(kernel: Any, grid: tuple | Callable, *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel`` (a ``@triton.jit`` function or a ``triton.autotune`` of one) on ``grid``."""
    if _TRACING.get():
        # torch.library: imported here so that eager launches never pay for it
        from torch.library import wrap_triton

        wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs, enable_fp_fusion=False)
