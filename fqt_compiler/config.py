"""FQTConfig: the frozen, validated configuration of one ``fqt`` backend instance."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any

from .errors import OptionsError, SpecError
from .monitor import Monitor
from .recipes import DEFAULT_RECIPE, Recipe, recipe
from .rules import Rule
from .specs import GemmKind, TensorRole

__all__ = ["Mode", "Fusion", "Inference", "FQTConfig", "INDUCTOR_MODES"]


class Mode(enum.Enum):
    """How rewritten graphs execute."""

    KERNELS = "kernels"  # realizable GEMMs lowered to low-bit kernels; the rest by Inductor (or eager)
    REFERENCE = "reference"  # eager, with the pure-torch reference ops (simulated quantization)


class Fusion(enum.Enum):
    """Where quantization is fused into the ops around it (kernels mode)."""

    AUTO = "auto"  # CUDA: generated Triton prologue kernels; CPU: Inductor fuses the inlined quantizers
    OFF = "off"  # every quantization a standalone kernel reading a materialized input (the baseline)
    TRITON = "triton"  # generated Triton kernels on every device (CPU: Triton's interpreter; tests)


class Inference(enum.Enum):
    """What graphs traced without autograd (``torch.no_grad``, ``inference_mode``, evaluation)
    do: Dynamo traces them separately from the training graphs (it guards on grad mode)."""

    QUANTIZED = "quantized"  # the forward quantization of training: evaluates what was trained
    HIGH_PRECISION = "high_precision"  # no quantization at all: a plain Inductor compile


def _parse_enum(name: str, value: Any, enum_cls: type[enum.Enum]) -> enum.Enum:
    """An enum member from itself or its (case-insensitive) value, else an OptionsError."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).lower())
    except ValueError:
        raise OptionsError(f"option {name}={value!r} is not valid; use one of {[m.value for m in enum_cls]}") from None


# torch.compile's modes (torch._inductor.list_mode_options)
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _resolve_mode(merged: dict[str, Any]) -> None:
    """Move ``merged["mode"]`` to ``inductor_mode`` or (with a warning) to ``execution``."""
    import warnings

    value = merged.pop("mode")
    target = "inductor_mode" if str(value).lower() in INDUCTOR_MODES else None
    if isinstance(value, Mode) or str(value).lower() in [m.value for m in Mode]:
        warnings.warn(f"fqt option mode={str(getattr(value, 'value', value))!r} is now execution=...; 'mode' is torch.compile's "
                      "Inductor mode", FutureWarning, stacklevel=4)
        target = "execution"
    if target is None:
        raise OptionsError(f"option mode={value!r} is not valid: fqt's execution mode is the option 'execution' "
                           f"({[m.value for m in Mode]}); torch.compile's modes are {list(INDUCTOR_MODES)}")
    if target in merged:
        raise OptionsError(f"option mode={value!r} given together with {target}={merged[target]!r}; give one")
    merged[target] = str(value).lower() if target == "inductor_mode" else value


def _parse_monitor(value: Any) -> Monitor | None:
    """``monitor=``: a Monitor, an int sampling period, True (period 100), or None / False."""
    if value is None or value is False:
        return None
    if value is True:
        return Monitor()
    if isinstance(value, int) and not isinstance(value, bool):
        return Monitor(every=value)
    return value  # validated in __post_init__


@dataclass(frozen=True, kw_only=True)
class FQTConfig:
    """Configuration of the ``fqt`` backend.

    Build one with :meth:`from_options` (what ``torch.compile(..., options=...)`` and
    :func:`fqt_compiler.backend` do) so that strings are parsed and unknown keys rejected.
    """

    recipe: Recipe
    """Spec per operand of each of the three GEMMs."""
    execution: Mode = Mode.KERNELS
    """How the rewritten graphs execute (``"kernels"`` or ``"reference"``); formerly the option
    ``mode``, which ``from_options`` still accepts with a warning."""
    inductor: bool = True
    """In kernels mode, compile everything around the low-bit kernels with Inductor; False runs
    it eagerly (fast to compile: tests, debugging)."""
    fusion: Fusion = Fusion.AUTO
    """Prologue fusion of quantizers with their producers (kernels mode); see :class:`Fusion`."""
    never_slower: bool = False
    """Keep in high precision every GEMM the roofline cost model (``fqt_compiler.codegen.cost``) says cannot
    win in low precision on the compiling device; the decision table says so (``by-cost``)."""
    strict: bool = False
    """Raise UnsupportedGraphError instead of skipping a GEMM the recipe wants quantized."""
    debug: bool = False
    """Run the invariant verifier after every pass and keep each pass's graph text."""
    rules: tuple = ()
    """Placement rules (``fqt.Rule``), first match wins per GEMM; the recipe decides the rest."""
    inference: Inference = Inference.QUANTIZED
    """Graphs traced without autograd: quantized like the training forward (the default) or
    left in high precision; see :class:`Inference`."""
    inductor_mode: str = "default"
    """torch.compile's ``mode`` for what Inductor compiles (kernels mode): ``"default"``,
    ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``, ``"reduce-overhead"``. Set by
    ``torch.compile(m, backend="fqt", mode=...)``; inside ``options`` use this name, since torch
    refuses ``mode`` together with ``options``."""
    monitor: Monitor | None = None
    """Live numerics monitoring (:class:`fqt_compiler.Monitor`): every ``every``-th call of each
    training graph runs an instrumented variant and reports per-site records. ``from_options``
    also takes an int (the period) or True (a period of 100). None: no monitoring, no extra node."""

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, Recipe):
            raise SpecError(f"FQTConfig.recipe must be a Recipe, got {type(self.recipe).__name__}")
        if not isinstance(self.execution, Mode):
            raise OptionsError(f"FQTConfig.execution must be a Mode, got {self.execution!r}")
        if self.inductor_mode not in INDUCTOR_MODES:
            raise OptionsError(f"option inductor_mode={self.inductor_mode!r} is not valid; use one of {list(INDUCTOR_MODES)}")
        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            raise OptionsError(f"option rules must be a sequence of fqt.Rule, got {self.rules!r}")
        if not isinstance(self.fusion, Fusion):
            raise OptionsError(f"FQTConfig.fusion must be a Fusion, got {self.fusion!r}")
        if self.monitor is not None and not isinstance(self.monitor, Monitor):
            raise OptionsError(f"option monitor must be a fqt.Monitor, an int period or True, got {self.monitor!r}")
        if not isinstance(self.inference, Inference):
            raise OptionsError(f"FQTConfig.inference must be an Inference, got {self.inference!r}")
        for name in ("strict", "debug", "inductor", "never_slower"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"option {name!r} must be True or False, got {getattr(self, name)!r}")
        if self.never_slower and self.execution is Mode.REFERENCE:
            raise OptionsError(
                "never_slower=True keeps GEMMs that cannot beat high precision with low-bit kernels; execution='reference' "
                "runs no kernels (it simulates every GEMM). Use execution='kernels', or drop never_slower"
            )

    @classmethod
    def option_names(cls) -> list[str]:
        """The options ``from_options`` takes (``mode`` too: see :meth:`from_options`)."""
        return [f.name for f in fields(cls)]

    @property
    def mode(self) -> Mode:
        """The execution mode (the former name of :attr:`execution`)."""
        return self.execution

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None, **kwargs: Any) -> FQTConfig:
        """Parse user options (strings allowed for ``recipe``, ``execution`` and ``fusion``).

        ``mode`` is read by its value: an Inductor mode (``"max-autotune"``, ...) sets
        ``inductor_mode``, as in ``torch.compile``; ``"kernels"`` / ``"reference"`` set
        ``execution`` (its former name) with a FutureWarning."""
        merged = dict(options or {})
        overlap = set(merged) & set(kwargs)
        if overlap:
            raise OptionsError(f"option(s) {sorted(overlap)} given twice")
        merged.update(kwargs)
        if "mode" in merged:
            _resolve_mode(merged)
        unknown = sorted(set(merged) - set(cls.option_names()))
        if unknown:
            raise OptionsError(f"unknown fqt option(s) {unknown}; valid options are {cls.option_names()}")
        merged["recipe"] = recipe(merged.get("recipe", DEFAULT_RECIPE))
        merged["execution"] = _parse_enum("execution", merged.get("execution", Mode.KERNELS), Mode)
        merged["fusion"] = _parse_enum("fusion", merged.get("fusion", Fusion.AUTO), Fusion)
        merged["inference"] = _parse_enum("inference", merged.get("inference", Inference.QUANTIZED), Inference)
        merged["monitor"] = _parse_monitor(merged.get("monitor"))
        rules = merged.get("rules", ())
        if isinstance(rules, (list, tuple)):
            merged["rules"] = tuple(rules)
        return cls(**merged)

    def uuid(self) -> str:
        """A stable text identity of everything that shapes the rewritten graphs (recipe specs,
        rules, execution, fusion, Inductor mode): two configs with the same uuid compile identically."""
        import hashlib

        r = self.recipe
        specs = [(k.value, role.value, getattr(r.spec(k, role), "key", lambda: None)()) for k in GemmKind for role in TensorRole]
        text = repr((r.name, specs, [rule.key() for rule in self.rules], self.execution.value, self.inductor, self.fusion.value,
                     self.never_slower, self.inductor_mode, self.inference.value))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
