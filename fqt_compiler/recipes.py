"""Recipes: a QuantSpec (or None = high precision) for each operand of each of the three GEMMs.

The paper's recipes follow its reference code exactly (docs/quantizers.md §2-3):

* forward (all FQT recipes and ``qat``): 8-bit per-tensor asymmetric min-max activations and
  8-bit per-tensor zero-on-grid weights, round to nearest; the backward GEMMs reuse the same
  quantized forward operands (straight-through estimator);
* ``ptq{b}``: ``grad_output`` of both backward GEMMs quantized per tensor, zero-on-grid,
  stochastic rounding, b bits;
* ``psq{b}``: per-row (per-sample) asymmetric for ``grad_input``; per-column asymmetric for
  ``grad_weight``; stochastic, b bits;
* ``bhq{b}``: block Householder + per-row asymmetric for ``grad_input``; per-column asymmetric
  for ``grad_weight``; stochastic, b bits.

Each backward GEMM gets its own independent quantization of ``grad_output`` ("biprecision").
The reference code keeps the weight-gradient branch at 8 bits unless ``--bwbits`` is set; these
recipes use b bits on both branches, as the paper's b-bit results describe (docs/quantizers.md §5).

``int8`` (the default) is the performance recipe: symmetric int8 with per-row (per-sample)
activations, per-out-channel weights for ``output``, per-in-channel weights for ``grad_input``,
per-channel activations for ``grad_weight``, and stochastic per-row / per-channel
``grad_output``: every layout is one a real int8 GEMM or implicit-GEMM convolution can apply in
its epilogue (``Granularity.CHANNEL``: a matrix's column, a convolution operand's dim-1 channel).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields

from .errors import SpecError
from .specs import GemmKind, Granularity, QuantSpec, Rounding, Scheme, TensorRole, Transform

__all__ = ["OutputSpecs", "GradInputSpecs", "GradWeightSpecs", "Recipe", "recipes", "recipe"]


def _check_spec(owner: str, name: str, value: object) -> None:
    if value is not None and not isinstance(value, QuantSpec):
        raise SpecError(f"{owner}.{name} must be a QuantSpec or None, got {type(value).__name__}")


@dataclass(frozen=True, kw_only=True)
class OutputSpecs:
    """Specs of the forward GEMM ``output = activation @ weight.T``."""

    activation: QuantSpec | None = None
    weight: QuantSpec | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_spec("output", f.name, getattr(self, f.name))


@dataclass(frozen=True, kw_only=True)
class GradInputSpecs:
    """Specs of ``grad_input = grad_output @ weight``.

    ``weight``: None means the backward GEMM uses the unquantized weight; the same spec as
    ``output.weight`` means it reuses the forward's quantized weight (the paper's semantics); a
    different spec re-quantizes the forward's quantized weight in this GEMM's layout.
    """

    grad_output: QuantSpec | None = None
    weight: QuantSpec | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_spec("grad_input", f.name, getattr(self, f.name))


@dataclass(frozen=True, kw_only=True)
class GradWeightSpecs:
    """Specs of ``grad_weight = grad_output.T @ activation`` (same reuse rule as GradInputSpecs)."""

    grad_output: QuantSpec | None = None
    activation: QuantSpec | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_spec("grad_weight", f.name, getattr(self, f.name))


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A named quantization recipe for the three GEMMs of every layer."""

    name: str
    """Name used in tables and ``options={"recipe": ...}``."""
    description: str = ""
    output: OutputSpecs = OutputSpecs()
    grad_input: GradInputSpecs = GradInputSpecs()
    grad_weight: GradWeightSpecs = GradWeightSpecs()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("Recipe.name must be a non-empty string")
        for attr, cls in (("output", OutputSpecs), ("grad_input", GradInputSpecs), ("grad_weight", GradWeightSpecs)):
            if not isinstance(getattr(self, attr), cls):
                raise SpecError(f"Recipe.{attr} must be a {cls.__name__}")
        for attr in ("output",):
            for spec in (self.output.activation, self.output.weight):
                if spec is not None and spec.transform is not Transform.NONE:
                    raise SpecError(f"Recipe.{attr}: transforms (BHQ) are gradient quantizers; use them on grad_output only")

    def spec(self, gemm: GemmKind, role: TensorRole) -> QuantSpec | None:
        """The spec of ``role`` in ``gemm`` (grad_lhs / grad_rhs map to grad_input / grad_weight)."""
        group = {
            GemmKind.OUTPUT: self.output,
            GemmKind.GRAD_INPUT: self.grad_input,
            GemmKind.GRAD_LHS: self.grad_input,
            GemmKind.GRAD_WEIGHT: self.grad_weight,
            GemmKind.GRAD_RHS: self.grad_weight,
        }[gemm]
        return getattr(group, role.value, None)


# --------------------------------------------------------------------------- built-ins
# Asymmetric codes take the 2**b levels 0..B of the paper; ``format="int"`` stores them shifted
# into int8, so the same codes can feed a real int8 GEMM (the shift folds into the zero point).
_PAPER_ACTIVATION = QuantSpec(bits=8, scheme=Scheme.ASYMMETRIC, format="int")
_PAPER_WEIGHT = QuantSpec(bits=8, scheme=Scheme.ZERO_ON_GRID, format="int")
_PAPER_OUTPUT = OutputSpecs(activation=_PAPER_ACTIVATION, weight=_PAPER_WEIGHT)


def _paper(name: str, description: str, gi_grad: QuantSpec | None, gw_grad: QuantSpec | None) -> Recipe:
    return Recipe(
        name=name,
        description=description,
        output=_PAPER_OUTPUT,
        grad_input=GradInputSpecs(grad_output=gi_grad, weight=_PAPER_WEIGHT),
        grad_weight=GradWeightSpecs(grad_output=gw_grad, activation=_PAPER_ACTIVATION),
    )


def _build() -> dict[str, Recipe]:
    out: dict[str, Recipe] = {
        "exact": Recipe(name="exact", description="no quantization (full-precision reference)"),
        "qat": _paper("qat", "8-bit per-tensor forward, full-precision backward (STE)", None, None),
    }
    for b in range(4, 9):
        sr = dict(format="int", bits=b, rounding=Rounding.STOCHASTIC)
        per_column = QuantSpec(scheme=Scheme.ASYMMETRIC, granularity=Granularity.COLUMN, **sr)
        out[f"ptq{b}"] = _paper(
            f"ptq{b}",
            f"8-bit forward; {b}-bit per-tensor zero-on-grid stochastic gradients (PTQ)",
            QuantSpec(scheme=Scheme.ZERO_ON_GRID, **sr),
            QuantSpec(scheme=Scheme.ZERO_ON_GRID, **sr),
        )
        out[f"psq{b}"] = _paper(
            f"psq{b}",
            f"8-bit forward; {b}-bit per-sample (grad_input) / per-column (grad_weight) stochastic gradients (PSQ)",
            QuantSpec(scheme=Scheme.ASYMMETRIC, granularity=Granularity.ROW, **sr),
            per_column,
        )
        out[f"bhq{b}"] = _paper(
            f"bhq{b}",
            f"8-bit forward; {b}-bit block Householder (grad_input) / per-column (grad_weight) stochastic gradients (BHQ)",
            QuantSpec(
                scheme=Scheme.ASYMMETRIC, granularity=Granularity.ROW, transform=Transform.BLOCK_HOUSEHOLDER, **sr
            ),
            per_column,
        )
    sym8 = dict(format="int", bits=8, scheme=Scheme.SYMMETRIC)
    out["int8"] = Recipe(
        name="int8",
        description="symmetric int8 in all three GEMMs, every scale layout realizable by an int8 GEMM (default)",
        output=OutputSpecs(
            activation=QuantSpec(granularity=Granularity.ROW, **sym8),
            weight=QuantSpec(granularity=Granularity.ROW, **sym8),
        ),
        grad_input=GradInputSpecs(
            grad_output=QuantSpec(granularity=Granularity.ROW, rounding=Rounding.STOCHASTIC, **sym8),
            weight=QuantSpec(granularity=Granularity.CHANNEL, **sym8),
        ),
        grad_weight=GradWeightSpecs(
            grad_output=QuantSpec(granularity=Granularity.CHANNEL, rounding=Rounding.STOCHASTIC, **sym8),
            activation=QuantSpec(granularity=Granularity.CHANNEL, **sym8),
        ),
    )
    e4m3 = dict(format="fp8_e4m3", scheme=Scheme.SYMMETRIC)
    e5m2 = dict(format="fp8_e5m2", scheme=Scheme.SYMMETRIC, rounding=Rounding.STOCHASTIC)
    out["fp8"] = Recipe(
        name="fp8",
        description="fp8 e4m3 forward operands, e5m2 stochastic gradients; row/column scales realizable by an fp8 GEMM",
        output=OutputSpecs(
            activation=QuantSpec(granularity=Granularity.ROW, **e4m3),
            weight=QuantSpec(granularity=Granularity.ROW, **e4m3),
        ),
        grad_input=GradInputSpecs(
            grad_output=QuantSpec(granularity=Granularity.ROW, **e5m2),
            weight=QuantSpec(granularity=Granularity.CHANNEL, **e4m3),
        ),
        grad_weight=GradWeightSpecs(
            grad_output=QuantSpec(granularity=Granularity.CHANNEL, **e5m2),
            activation=QuantSpec(granularity=Granularity.CHANNEL, **e4m3),
        ),
    )
    return out


_RECIPES = _build()
DEFAULT_RECIPE = "int8"


def recipes() -> list[str]:
    """Names of the built-in recipes."""
    return list(_RECIPES)


def recipe(name: str | Recipe) -> Recipe:
    """The built-in recipe called ``name`` (a Recipe passes through unchanged)."""
    if isinstance(name, Recipe):
        return name
    if not isinstance(name, str):
        raise SpecError(f"recipe must be a name or a Recipe, got {type(name).__name__}")
    try:
        return _RECIPES[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), _RECIPES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SpecError(f"unknown recipe {name!r}.{hint} Valid recipes: {', '.join(_RECIPES)}") from None
