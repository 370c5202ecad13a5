"""Reference ops compiled on their own by Inductor, one per input shape: the CPU twins of the
standalone Triton kernels (what ``fusion="off"`` measures), used by the ``fqt::*_kernel`` ops."""

from __future__ import annotations

import types

import torch

from .layout import Layout
from .reference import quantize_ref
from .specs import QuantSpec

__all__ = ["standalone_cpu"]


_STANDALONE: dict = {}


def standalone_cpu(spec: QuantSpec | None, layout: Layout, fn=None, example: torch.Tensor | None = None):
    """A reference op compiled on its own by Inductor for one input shape: the CPU twin of a
    standalone Triton kernel, the baseline that ``fusion="off"`` measures. Same numbers as the
    reference, except stochastic rounding draws from Inductor's random stream."""
    fn = fn or quantize_ref
    shape = (tuple(example.shape), tuple(example.stride()), example.dtype) if example is not None else None
    key = (fn.__name__, spec.key() if spec is not None else None, layout, shape)
    if key not in _STANDALONE:
        from .lowerings import register_lowerings  # Inductor is imported on first use

        register_lowerings()
        if spec is None:
            def run(*t):
                return fn(*t, layout)
        else:
            def run(x):
                return fn(x, spec, layout)
        # a fresh code object per shape: its own Dynamo cache, never a recompile-limit hit
        fresh = types.FunctionType(
            run.__code__.replace(), run.__globals__, f"fqt_standalone_{fn.__name__}", None, run.__closure__
        )
        _STANDALONE[key] = _below_autograd(torch.compile(fresh, dynamic=False, fullgraph=True))
    return _STANDALONE[key]


def _below_autograd(compiled):
    """Call ``compiled`` with the autograd and ADInplaceOrView keys always excluded.

    Dynamo guards each input's dispatch keys as seen through the caller's excluded keys. These
    ops are first run while a graph is compiled (every key but the backend's excluded) and later
    from a compiled step (ADInplaceOrView not excluded), so without a fixed view every
    standalone quantizer recompiled on the second training step. The ops run below autograd
    either way: excluding the keys changes nothing they compute."""

    def run(*args):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return compiled(*args)

    return run
