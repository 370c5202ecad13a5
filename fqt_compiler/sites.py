"""What the passes record about every GEMM site: the decision table's data.

A *site* is one forward GEMM (``mm``/``addmm``/``bmm``/``baddbmm``/``convolution``) together with
the backward GEMMs that differentiate it (paired through ``node.meta["seq_nr"]``), or an
unsupported GEMM-like node (fused attention, matrix-vector products, ...) reported as skipped.
Every GEMM of every site ends in exactly one :class:`GemmStatus`, with a reason when skipped:
nothing is left in high precision without a record.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .specs import GemmKind, QuantSpec, TensorRole

__all__ = [
    "GemmStatus", "SkipKind", "OperandSource", "QuantNodeKind", "OperandDecision", "GemmDecision", "SiteDecision",
    "QuantNodeInfo", "GemmNodeInfo",
]


class GemmStatus(enum.Enum):
    LOWBIT_KERNEL = "lowbit-kernel"  # runs as a real low-bit GEMM (codegen stage)
    SIMULATED = "simulated"  # quantize-dequantize, then a high-precision GEMM
    SKIPPED = "skipped"  # high precision, with a reason


class SkipKind(enum.Enum):
    BY_RECIPE = "by-recipe"  # the recipe asks for high precision: deliberate, never an error
    BY_RULE = "by-rule"  # a placement rule asks for high precision: deliberate too
    BY_COST = "by-cost"  # never_slower: the cost model says low-bit cannot win here
    UNSUPPORTED = "unsupported"  # fqt cannot quantize it; strict mode raises


class _TextEnum(str, enum.Enum):
    """An enum whose members read as their text (tables, comparisons with the plain text)."""

    def __str__(self) -> str:
        return self.value


class OperandSource(_TextEnum):
    """Where a GEMM operand's quantization comes from."""

    QUANTIZED = "quantized"  # its own quantizer
    HIGH_PRECISION = "high precision"
    REUSES_OUTPUT = "reuses output quantization"  # a backward GEMM reads the forward's codes
    REQUANTIZED = "re-quantized from output quantization"  # another layout of the forward's quantized values


class QuantNodeKind(_TextEnum):
    """What a node ``insert_qdq`` adds does."""

    QUANTIZE = "quantize"  # codes and statistics of a high-precision tensor
    DEQUANTIZE = "dequantize"  # back to high precision, the value a simulated GEMM reads
    TRANSFORM = "transform"  # BHQ's inverse transform after the dequantization
    REPLAY = "replay"  # the forward's view chain replayed on its statistics, for a backward GEMM


@dataclass(frozen=True)
class OperandDecision:
    """How one operand of one GEMM is treated."""

    role: TensorRole
    spec: QuantSpec | None
    source: OperandSource = OperandSource.HIGH_PRECISION


@dataclass(frozen=True)
class GemmDecision:
    kind: GemmKind
    node: str  # the fx node computing it in the joint graph
    shape: str  # "MxKxN" (batched: "BxMxKxN"), convs: "in->out" shapes
    flops: int
    operands: tuple[OperandDecision, ...]
    status: GemmStatus
    reason: str = ""
    skip_kind: SkipKind | None = None
    rule: str = ""  # what decided the specs: "recipe <name>" or "rule <name>"
    kernel: str = ""  # what runs a lowbit-kernel GEMM

    @property
    def quantized(self) -> bool:
        """Whether this GEMM runs on quantized operands: a low-bit kernel, or simulated with at
        least one operand quantized (the FLOPs that count as quantized in coverage reports)."""
        return self.status is GemmStatus.LOWBIT_KERNEL or (
            self.status is GemmStatus.SIMULATED and any(o.spec for o in self.operands)
        )

    @property
    def label(self) -> str:
        if self.status is GemmStatus.SKIPPED or (self.status is GemmStatus.SIMULATED and self.reason):
            return f"{self.status.value} ({self.reason})"
        if self.status is GemmStatus.LOWBIT_KERNEL and self.kernel:
            return f"{self.status.value} ({self.kernel})"
        return self.status.value


@dataclass(frozen=True)
class SiteDecision:
    """Everything recorded about one GEMM site."""

    site_id: int
    graph_id: int
    module_path: str
    op: str
    rule: str  # what decided it, e.g. "recipe int8"
    gemms: tuple[GemmDecision, ...] = field(default=())


@dataclass(frozen=True)
class QuantNodeInfo:
    """``node.meta["fqt"]`` of a node inserted by the passes."""

    site_id: int
    gemm: GemmKind
    role: TensorRole
    spec_key: str
    what: QuantNodeKind
    shared_with: frozenset[int] = frozenset()  # further sites using this node after dedupe

    def serves(self, site_id: int) -> bool:
        return site_id == self.site_id or site_id in self.shared_with


@dataclass(frozen=True)
class GemmNodeInfo:
    """``node.meta["fqt"]`` of a GEMM node the passes decided on."""

    site_id: int
    gemm: GemmKind
    quantized_args: tuple[int, ...]  # positional arg indices expected to come from fqt nodes
