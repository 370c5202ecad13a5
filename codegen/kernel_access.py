"""Which arguments an fqt Triton kernel reads and writes, worked out once per kernel variant.

When a ``wrap_triton`` launch is traced, and again when Inductor lowers the resulting kernel
node, torch finds the tensors the kernel mutates by compiling the kernel to Triton's IR and
walking its stores (``torch._higher_order_ops.triton_kernel_wrap``). It does so for every
launch, with no cache: a ResNet-50 training step has some 500 fqt launches, and the analysis
took 65 ms a launch on a 2-core CPU, several times per launch (the trace, Inductor's lowering),
which made most of the step's compile time on an H200.

Which arguments a kernel writes depends on the kernel, its ``constexpr`` values and the types
of its arguments, not on the runtime sizes (an integer's specialization to the constant 1 is
part of the key all the same). :func:`install` wraps torch's analysis with a cache on that key, for fqt's
own kernels only (a kernel whose Python function lives in an ``fqt_`` module); every other
kernel goes straight to torch's analysis, as before.
"""

from __future__ import annotations

import copy
import functools
import threading

import torch

__all__ = ["install", "cache_info", "access_key"]

# torch's analysis entry points, newest first; torch 2.11 to 2.13 define one of them
_ENTRY_POINTS = ("identify_accessed_tensors", "identify_mutated_tensors")
_CACHE: dict = {}
_STATS = {"hits": 0, "misses": 0}
_LOCK = threading.Lock()


def _jit_function(kernel):
    """The ``JITFunction`` under autotuner / heuristics wrappers (each has ``.fn``)."""
    from triton.runtime.jit import JITFunction  # Triton: only CUDA graphs get here

    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _is_fqt_kernel(kernel) -> bool:
    jit = _jit_function(kernel)
    module = getattr(getattr(jit, "fn", None), "__module__", "") or ""
    return module.startswith(("fqt_compiler.", "fqt_"))


def _value_key(value, constexpr: bool):
    if getattr(value, "is_Integer", False):  # Inductor passes static sizes as sympy integers
        value = int(value)
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    get_dtype = getattr(value, "get_dtype", None)  # Inductor's buffers (TensorBox and the like)
    if callable(get_dtype):
        return ("buffer", get_dtype())
    if isinstance(value, bool) or value is None or isinstance(value, (float, str, torch.dtype)):
        return value
    if isinstance(value, int):
        # a runtime int changes which stores exist only through Triton's specialization of
        # the value 1 to a constant (branches on it fold); divisibility changes alignment only
        return value if constexpr else ("int", value == 1)
    return ("symbolic", type(value).__name__)


def access_key(kernel, kwargs: dict):
    """The cache key of one analysis: the kernel, and per argument its constexpr value, its
    type, or its integer specialization."""
    jit = _jit_function(kernel)
    names = getattr(jit, "arg_names", ())
    constexprs = {names[i] for i in getattr(jit, "constexprs", ()) if i < len(names)}
    # torch wraps a launch's num_warps / num_stages in a fresh one-config autotuner per launch,
    # and analyses the first config: the wrappers' types and that config's values are the key
    wrappers, outer = [], kernel
    while outer is not jit and hasattr(outer, "fn"):
        configs = getattr(outer, "configs", None) or []
        wrappers.append((type(outer).__name__, tuple(sorted(configs[0].kwargs.items())) if configs else ()))
        outer = outer.fn
    args = tuple(sorted((name, _value_key(value, name in constexprs)) for name, value in kwargs.items()))
    return (id(jit), tuple(wrappers), args)


def _cached(real):
    @functools.wraps(real)
    def analysis(kernel, kwargs, *rest, **more):
        if not _is_fqt_kernel(kernel):
            return real(kernel, kwargs, *rest, **more)
        key = (access_key(kernel, kwargs), repr(rest), repr(sorted(more.items())))
        with _LOCK:
            hit = key in _CACHE
            _STATS["hits" if hit else "misses"] += 1
        if not hit:
            result = real(kernel, kwargs, *rest, **more)
            with _LOCK:
                _CACHE[key] = (_jit_function(kernel), result)  # kept alive: its id stays its own
        return copy.deepcopy(_CACHE[key][1])  # callers own their result

    analysis.fqt_cached = True
    return analysis


def install() -> None:
    """Wrap torch's tensor-access analysis of Triton kernels with the cache (idempotent)."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    for name in _ENTRY_POINTS:
        real = getattr(wrap, name, None)
        if real is not None and not getattr(real, "fqt_cached", False):
            setattr(wrap, name, _cached(real))


def cache_info() -> dict:
    """Hits, misses and entries of the cache (``fqt inspect`` and the tests read it)."""
    with _LOCK:
        return {**_STATS, "entries": len(_CACHE)}
