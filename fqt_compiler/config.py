"""FQTConfig: the frozen, validated configuration of one ``fqt`` backend instance."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any

from .errors import OptionsError, SpecError
from .recipes import DEFAULT_RECIPE, Recipe, recipe
from .specs import GemmKind, TensorRole

__all__ = ["Mode", "Fusion", "FQTConfig"]


class Mode(enum.Enum):
    """How rewritten graphs execute."""

    KERNELS = "kernels"  # realizable GEMMs lowered to low-bit kernels; the rest by Inductor (or eager)
    REFERENCE = "reference"  # eager, with the pure-torch reference ops (simulated quantization)


class Fusion(enum.Enum):
    """Where quantization is fused into the ops around it (kernels mode)."""

    AUTO = "auto"  # CUDA: generated Triton prologue kernels; CPU: Inductor fuses the inlined quantizers
    OFF = "off"  # every quantization a standalone kernel reading a materialized input (the baseline)
    TRITON = "triton"  # generated Triton kernels on every device (CPU: Triton's interpreter; tests)


def _parse_enum(name: str, value: Any, enum_cls: type[enum.Enum]) -> enum.Enum:
    """An enum member from itself or its (case-insensitive) value, else an OptionsError."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).lower())
    except ValueError:
        raise OptionsError(f"option {name}={value!r} is not valid; use one of {[m.value for m in enum_cls]}") from None


@dataclass(frozen=True, kw_only=True)
class FQTConfig:
    """Configuration of the ``fqt`` backend.

    Build one with :meth:`from_options` (what ``torch.compile(..., options=...)`` and
    :func:`fqt_compiler.backend` do) so that strings are parsed and unknown keys rejected.
    """

    recipe: Recipe
    """Spec per operand of each of the three GEMMs."""
    mode: Mode = Mode.KERNELS
    """Execution mode of the rewritten graphs."""
    inductor: bool = True
    """In kernels mode, compile everything around the low-bit kernels with Inductor; False runs
    it eagerly (fast to compile: tests, debugging)."""
    fusion: Fusion = Fusion.AUTO
    """Prologue fusion of quantizers with their producers (kernels mode); see :class:`Fusion`."""
    never_slower: bool = False
    """Keep in high precision every GEMM the roofline cost model (``codegen.cost``) says cannot
    win in low precision on the compiling device; the decision table says so (``by-cost``)."""
    strict: bool = False
    """Raise UnsupportedGraphError instead of skipping a GEMM the recipe wants quantized."""
    debug: bool = False
    """Run the invariant verifier after every pass and keep each pass's graph text."""
    rules: tuple = ()
    """Placement rules (``fqt.Rule``), first match wins per GEMM; the recipe decides the rest."""

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, Recipe):
            raise SpecError(f"FQTConfig.recipe must be a Recipe, got {type(self.recipe).__name__}")
        if not isinstance(self.mode, Mode):
            raise OptionsError(f"FQTConfig.mode must be a Mode, got {self.mode!r}")
        from .rules import Rule

        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            raise OptionsError(f"option rules must be a sequence of fqt.Rule, got {self.rules!r}")
        if not isinstance(self.fusion, Fusion):
            raise OptionsError(f"FQTConfig.fusion must be a Fusion, got {self.fusion!r}")
        for name in ("strict", "debug", "inductor", "never_slower"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"option {name!r} must be True or False, got {getattr(self, name)!r}")
        if self.never_slower and self.mode is Mode.REFERENCE:
            raise OptionsError(
                "never_slower=True keeps GEMMs that cannot beat high precision with low-bit kernels; mode='reference' "
                "runs no kernels (it simulates every GEMM). Use mode='kernels', or drop never_slower"
            )

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None, **kwargs: Any) -> FQTConfig:
        """Parse user options (strings allowed for ``recipe`` and ``mode``)."""
        merged = dict(options or {})
        overlap = set(merged) & set(kwargs)
        if overlap:
            raise OptionsError(f"option(s) {sorted(overlap)} given twice")
        merged.update(kwargs)
        unknown = sorted(set(merged) - set(cls.option_names()))
        if unknown:
            raise OptionsError(f"unknown fqt option(s) {unknown}; valid options are {cls.option_names()}")
        merged["recipe"] = recipe(merged.get("recipe", DEFAULT_RECIPE))
        merged["mode"] = _parse_enum("mode", merged.get("mode", Mode.KERNELS), Mode)
        merged["fusion"] = _parse_enum("fusion", merged.get("fusion", Fusion.AUTO), Fusion)
        rules = merged.get("rules", ())
        if isinstance(rules, (list, tuple)):
            merged["rules"] = tuple(rules)
        return cls(**merged)

    def uuid(self) -> str:
        """A stable text identity of everything that shapes the rewritten graphs (recipe specs,
        rules, mode): two configs with the same uuid compile identically."""
        import hashlib

        r = self.recipe
        specs = [(k.value, role.value, getattr(r.spec(k, role), "key", lambda: None)()) for k in GemmKind for role in TensorRole]
        text = repr((r.name, specs, [rule.key() for rule in self.rules], self.mode.value, self.inductor, self.fusion.value, self.never_slower))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
