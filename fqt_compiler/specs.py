"""Quantization specs: the vocabulary every other module speaks.

A :class:`QuantSpec` says how one operand of one GEMM is quantized: its number format and bit
width, the granularity of its scales, the scheme (symmetric, asymmetric min-max, or the paper's
"zero-on-grid" weight quantizer), the rounding (nearest or stochastic) and an optional transform
(block Householder, BHQ). Specs are frozen and validated on construction, so an invalid spec
cannot exist.

Layout convention. A quantizer sees its tensor as a 2-D matrix in the tensor role's *natural*
layout (see docs/design.md, "Scale layouts"): ``activation`` and ``grad_output`` are (tokens or samples) x features,
``weight`` is (out channels) x (in channels). ``ROW`` means one scale per row of that matrix,
``COLUMN`` one per column, ``BLOCK`` one per run of ``block_size`` consecutive elements of a row.
``CHANNEL`` is one scale per feature: the column of a matrix operand, and for a convolution
operand (rows = dim 0) one per channel, dim 1, shared by every spatial position -- the
per-channel scale a convolution's implicit GEMM can apply, where ``COLUMN`` would give one
scale per (channel, position).
For the public :func:`fqt_compiler.quantize`, rows are dim 0 after flattening to 2-D.

Code ranges (b = bits, B = 2**b - 1):

* ``INT`` symmetric: codes in [-(2**(b-1) - 1), 2**(b-1) - 1] (int8 storage, symmetric range).
* ``INT`` asymmetric / zero-on-grid: B + 1 levels 0..B, stored shifted by -2**(b-1) in int8.
* ``UINT`` asymmetric / zero-on-grid: levels 0..B stored as uint8. ``UINT`` cannot be symmetric.
* fp8 e4m3 / e5m2: symmetric only (there is no zero point in a float format).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from .errors import SpecError
from .quantizers import get_quantizer

__all__ = [
    "ElementFormat",
    "Granularity",
    "Scheme",
    "Rounding",
    "Transform",
    "TensorRole",
    "GemmKind",
    "QuantSpec",
]


class ElementFormat(enum.Enum):
    """Number format of the low-bit codes."""

    INT = "int"
    UINT = "uint"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"

    @property
    def is_float(self) -> bool:
        return self in (ElementFormat.FP8_E4M3, ElementFormat.FP8_E5M2)


class Granularity(enum.Enum):
    """Which elements share one scale (in the role's natural 2-D layout)."""

    TENSOR = "tensor"
    ROW = "row"
    COLUMN = "column"
    CHANNEL = "channel"  # COLUMN on matrices; one scale per dim-1 channel of a convolution operand
    BLOCK = "block"


class Scheme(enum.Enum):
    """How the quantization grid is placed over the data."""

    SYMMETRIC = "sym"  # grid symmetric around 0, scale from max |x|
    ASYMMETRIC = "asym"  # min-max grid, real-valued zero point (the paper's activations)
    ZERO_ON_GRID = "zog"  # min-max grid stretched so 0 is a level (the paper's weights, PTQ)


class Rounding(enum.Enum):
    NEAREST = "nearest"  # deterministic round half to even
    STOCHASTIC = "stochastic"  # unbiased: floor(v + U[0, 1))


class Transform(enum.Enum):
    NONE = "none"
    BLOCK_HOUSEHOLDER = "bhq"  # the paper's block Householder quantizer (docs/quantizers.md §3.5)


class TensorRole(enum.Enum):
    """Role of a GEMM operand (torchao vocabulary)."""

    ACTIVATION = "activation"
    WEIGHT = "weight"
    GRAD_OUTPUT = "grad_output"


class GemmKind(enum.Enum):
    """The three GEMMs of a layer. Activation x activation matmuls use grad_lhs / grad_rhs."""

    OUTPUT = "output"
    GRAD_INPUT = "grad_input"
    GRAD_WEIGHT = "grad_weight"
    GRAD_LHS = "grad_lhs"
    GRAD_RHS = "grad_rhs"


# Largest finite value of each fp8 format: symmetric fp8 scales map max|x| onto it.
_FP8_MAX = {ElementFormat.FP8_E4M3: 448.0, ElementFormat.FP8_E5M2: 57344.0}
_FP8_DTYPE = {
    ElementFormat.FP8_E4M3: torch.float8_e4m3fn,
    ElementFormat.FP8_E5M2: torch.float8_e5m2,
}


def _coerce(enum_type: type[enum.Enum], value: object, field: str) -> enum.Enum:
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        for member in enum_type:
            if value.lower() in (member.value, member.name.lower()):
                return member
    valid = ", ".join(repr(m.value) for m in enum_type)
    raise SpecError(f"QuantSpec.{field}={value!r} is not valid; use one of {valid} (or {enum_type.__name__}.*)")


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one GEMM operand is quantized. Frozen; validated on construction.

    Strings are accepted for the enum fields (``QuantSpec(granularity="row")``) and parsed at once.
    """

    format: ElementFormat = ElementFormat.INT
    """Number format of the codes."""
    bits: int = 8
    """Bit width, 2..8 for integer formats; always 8 for fp8."""
    granularity: Granularity = Granularity.TENSOR
    """Which elements share a scale, in the role's natural (rows x columns) layout."""
    block_size: int | None = None
    """Elements per scale along a row; required for and only for ``Granularity.BLOCK``."""
    scheme: Scheme = Scheme.SYMMETRIC
    """Grid placement: symmetric, asymmetric min-max, or zero-on-grid min-max."""
    rounding: Rounding = Rounding.NEAREST
    """Nearest (deterministic) or stochastic (unbiased) rounding."""
    transform: Transform = Transform.NONE
    """Optional transform applied before quantizing (BHQ needs per-row granularity)."""
    quantizer: str | None = None
    """Name of a registered custom quantizer (``fqt.register_quantizer``) that replaces the
    built-in ones; the other fields are passed to it. Runs simulated unless it has a kernel."""

    def __post_init__(self) -> None:
        # Parsing strings into enums happens here, at construction, so every later reader sees
        # enums only. This is construction, not mutation of a finished object.
        for field, enum_type in (
            ("format", ElementFormat),
            ("granularity", Granularity),
            ("scheme", Scheme),
            ("rounding", Rounding),
            ("transform", Transform),
        ):
            object.__setattr__(self, field, _coerce(enum_type, getattr(self, field), field))
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise SpecError(f"QuantSpec.bits must be an int, got {self.bits!r}")
        if self.format.is_float:
            if self.bits != 8:
                raise SpecError(
                    f"QuantSpec.bits={self.bits} with format={self.format.value}: fp8 formats have 8 bits; "
                    "drop bits or set bits=8"
                )
            if self.scheme is not Scheme.SYMMETRIC:
                raise SpecError(
                    f"QuantSpec.scheme={self.scheme.value!r} with format={self.format.value}: a zero point "
                    "cannot be represented in a float format; use scheme='sym' or an integer format"
                )
        elif not 2 <= self.bits <= 8:
            raise SpecError(f"QuantSpec.bits={self.bits} is out of range; integer formats support 2..8 bits")
        if self.format is ElementFormat.UINT and self.scheme is Scheme.SYMMETRIC:
            raise SpecError("QuantSpec.scheme='sym' needs signed codes; use format='int' or scheme='asym'/'zog' with 'uint'")
        if self.granularity is Granularity.BLOCK:
            if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
                raise SpecError(f"QuantSpec.block_size={self.block_size!r}: Granularity.BLOCK needs an int block_size >= 1")
        elif self.block_size is not None:
            raise SpecError(f"QuantSpec.block_size={self.block_size} is only meaningful with granularity='block'")
        if self.quantizer is not None:
            get_quantizer(self.quantizer)  # unknown names fail here, listing the registered ones
            if self.transform is not Transform.NONE:
                raise SpecError(f"QuantSpec.quantizer={self.quantizer!r} replaces the built-in quantizers; drop transform")
        if self.transform is Transform.BLOCK_HOUSEHOLDER and self.granularity is not Granularity.ROW:
            raise SpecError(
                "QuantSpec.transform='bhq' quantizes per row in the transformed space; "
                f"set granularity='row' (got {self.granularity.value!r})"
            )

    # ----------------------------------------------------------------- derived numbers
    @property
    def levels(self) -> int:
        """B = number of bins: codes take B + 1 values (asymmetric) or 2*qmax + 1 (symmetric)."""
        return 2**self.bits - 1

    @property
    def qmax(self) -> float:
        """Largest code magnitude of a symmetric grid (448 / 57344 for fp8)."""
        if self.format.is_float:
            return _FP8_MAX[self.format]
        return float(2 ** (self.bits - 1) - 1)

    @property
    def code_offset(self) -> int:
        """Stored code = level index (0..B) + code_offset (asymmetric int codes: -2**(bits-1))."""
        if self.format is ElementFormat.INT and self.scheme is not Scheme.SYMMETRIC:
            return -(2 ** (self.bits - 1))
        return 0

    @property
    def code_dtype(self) -> torch.dtype:
        if self.format.is_float:
            return _FP8_DTYPE[self.format]
        return torch.uint8 if self.format is ElementFormat.UINT else torch.int8

    @property
    def is_stochastic(self) -> bool:
        return self.rounding is Rounding.STOCHASTIC

    # ----------------------------------------------------------------- text forms
    def key(self) -> str:
        """Stable, parseable text form, used as the argument of the fqt custom ops."""
        gran = self.granularity.value + (str(self.block_size) if self.block_size else "")
        fmt = self.format.value if self.format.is_float else f"{self.format.value}{self.bits}"
        custom = f"/q={self.quantizer}" if self.quantizer else ""
        return f"{fmt}/{self.scheme.value}/{gran}/{self.rounding.value}/{self.transform.value}{custom}"

    def short(self) -> str:
        """Compact human form for tables, e.g. ``int8 sym row SR``."""
        fmt = self.format.value if self.format.is_float else f"{self.format.value}{self.bits}"
        gran = self.granularity.value + (str(self.block_size) if self.block_size else "")
        parts = [fmt, self.scheme.value, gran, "SR" if self.is_stochastic else "RN"]
        if self.transform is not Transform.NONE:
            parts.append(self.transform.value.upper())
        if self.quantizer:
            return f"custom:{self.quantizer} ({' '.join(parts)})"
        return " ".join(parts)

    def with_(self, **changes: object) -> QuantSpec:
        """A validated copy with some fields changed."""
        return replace(self, **changes)

    @staticmethod
    def from_key(key: str) -> QuantSpec:
        """Parse :meth:`key` output back into a spec (cached)."""
        return _parse_key(key)


@lru_cache(maxsize=None)
def _parse_key(key: str) -> QuantSpec:
    usage = (
        f"malformed spec key {key!r}; expected 'format/scheme/granularity/rounding/transform', e.g. 'int8/sym/row/nearest/none'"
    )
    parts = key.split("/") if isinstance(key, str) else []
    quantizer = None
    if len(parts) == 6 and parts[5].startswith("q="):
        quantizer = parts.pop()[2:]
    if len(parts) != 5:
        raise SpecError(usage)
    fmt, scheme, gran, rounding, transform = parts
    if fmt.startswith("fp8"):
        format_, bits = fmt, 8
    else:
        digits = fmt.lstrip("uint")
        if not digits.isdigit():
            raise SpecError(f"{usage}: format {fmt!r} needs a bit width such as 'int8' or 'uint4'")
        format_, bits = fmt[: len(fmt) - len(digits)], int(digits)
    block = None
    if gran.startswith("block"):
        if not gran[len("block"):].isdigit():
            raise SpecError(f"{usage}: block granularity needs a size such as 'block32'")
        block, gran = int(gran[len("block"):]), "block"
    return QuantSpec(
        format=format_, bits=bits, granularity=gran, block_size=block, scheme=scheme, rounding=rounding, transform=transform,
        quantizer=quantizer,
    )
