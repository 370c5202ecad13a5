"""Custom quantizers: register a quantize-dequantize function by name, use it in any spec.

    def ternary(x, spec, generator=None):          # x: the natural 2-D matrix, fp32
        s = x.abs().amax(dim=1, keepdim=True)       # one scale per row
        p = (x.abs() / s.clamp_min(1e-30)).clamp(max=1)
        keep = torch.rand(x.shape, generator=generator, device=x.device) < p
        return torch.where(keep, s * x.sign(), 0.0)  # E[Q(x)] = x: unbiased

    fqt.register_quantizer("ternary", ternary, unbiased=True)
    spec = fqt.QuantSpec(quantizer="ternary", bits=2)   # other fields are passed along

The contract:

* ``fn(x, spec, generator=None) -> x_hat`` receives the operand as its natural 2-D fp32 matrix
  (rows = samples / tokens for activations and gradients, out channels for weights; see
  ``specs.py``) and returns a tensor of the same shape: the quantize-dequantize of ``x``. The
  spec it gets is the user's (bits, granularity, rounding ... mean what the function makes of
  them).
* Randomness must come from ``generator`` (torch's default generator when None), so that
  ``torch.manual_seed`` reproduces a run.
* A quantizer used on ``grad_output`` should be unbiased (E[x_hat] = x): Theorem 1 (the FQT
  gradient is an unbiased estimator of the QAT gradient) holds only then. Declare it with
  ``unbiased=``; ``fqt_compiler.stats`` measures the bias and variance it actually adds.
* Forward (activation / weight) quantizers should be deterministic: the backward GEMMs reuse
  their output, and recomputation must give the same values.
* Without a kernel, a custom quantizer runs *simulated* (quantize-dequantize, then a
  high-precision GEMM), and the decision table says so. ``kernel=`` (same signature) is called
  instead in ``execution="kernels"`` on CUDA tensors: a Triton launcher, for instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import QuantizerError, SpecError

__all__ = [
    "CustomQuantizer", "register_quantizer", "registered_quantizers", "get_quantizer", "unregister_quantizer", "run_custom",
]


@dataclass(frozen=True)
class CustomQuantizer:
    """A registered quantizer: its function, whether it is unbiased, its optional kernel hook."""

    name: str
    fn: Callable
    unbiased: bool
    kernel: Callable | None = None
    description: str = ""


_REGISTRY: dict[str, CustomQuantizer] = {}


def register_quantizer(
    name: str, fn: Callable, *, unbiased: bool, kernel: Callable | None = None, description: str = "", replace: bool = False
) -> CustomQuantizer:
    """Register ``fn`` as the quantizer ``name`` (see the module docstring for the contract)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(f"quantizer name {name!r} must be an identifier (letters, digits, _)")
    if not callable(fn) or (kernel is not None and not callable(kernel)):
        raise SpecError(f"quantizer {name!r}: fn (and kernel, if given) must be callable")
    if name in _REGISTRY and not replace:
        raise SpecError(f"quantizer {name!r} is already registered; pass replace=True to redefine it")
    q = CustomQuantizer(name, fn, bool(unbiased), kernel, description)
    _REGISTRY[name] = q
    return q


def unregister_quantizer(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_quantizers() -> list[str]:
    return sorted(_REGISTRY)


def get_quantizer(name: str) -> CustomQuantizer:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(registered_quantizers()) or "none"
        raise SpecError(
            f"no quantizer named {name!r} is registered (registered: {known}); call fqt.register_quantizer first"
        ) from None


def run_custom(
    name: str, m: torch.Tensor, spec, *, kernel: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Call the registered quantizer ``name`` (its ``kernel`` hook if ``kernel``) on the natural
    matrix ``m`` and check the contract: a tensor of ``m``'s shape, finite wherever ``m`` is.
    A quantizer that turns finite values into NaN / Inf would otherwise surface much later as
    NaN gradients with no name attached: it raises :class:`QuantizerError` naming it."""
    q = get_quantizer(name)
    fn = q.kernel if kernel else q.fn
    out = fn(m, spec, generator=generator)
    which = f"custom quantizer {name!r}" + (" (kernel hook)" if kernel else "")
    if not isinstance(out, torch.Tensor) or out.shape != m.shape:
        raise QuantizerError(f"{which} returned {getattr(out, 'shape', type(out))}; expected shape {tuple(m.shape)}")
    bad = (~torch.isfinite(out) & torch.isfinite(m)).sum().item()
    if bad:
        raise QuantizerError(
            f"{which} returned NaN/Inf for {bad} of {m.numel()} finite inputs (spec {spec.short()}); "
            "a quantizer must be finite wherever its input is"
        )
    return out
