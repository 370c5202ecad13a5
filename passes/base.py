"""Pass infrastructure: the shared context, the working site objects, the pass base class.

Analysis passes (``find_sites``, ``select_specs``) only fill :class:`Site` objects; mutation
passes (``insert_qdq``, ``dedupe``) only act on what the analysis decided. A pass names its
preconditions in ``requires`` (the names of passes that must have run) and its postconditions
are checked by ``verify.py`` after it in debug mode.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from torch import fx

from fqt_compiler.config import FQTConfig
from fqt_compiler.layout import Layout
from fqt_compiler.sites import OperandSource, SiteDecision, SkipKind
from fqt_compiler.specs import GemmKind, QuantSpec, TensorRole


@dataclass
class BackwardGemm:
    """One backward GEMM of a site, as found in the joint graph."""

    node: fx.Node
    kind: GemmKind
    fwd_operand: int  # 0 = forward lhs, 1 = forward rhs: the forward operand this GEMM consumes
    fwd_arg: int  # arg index of that operand in ``node``
    grad_arg: int  # arg index of grad_output in ``node``
    chain: list[fx.Node]  # view nodes from the forward operand (exclusive) to the consumed arg
    fwd_layout: Layout  # natural layout of the consumed forward operand, as consumed here
    grad_layout: Layout  # natural layout of grad_output, as consumed here
    conv_output: int | None = None  # 0 grad_input / 1 grad_weight of a convolution_backward
    # filled by select_specs
    operand_spec: QuantSpec | None = None
    operand_source: OperandSource = OperandSource.HIGH_PRECISION
    grad_spec: QuantSpec | None = None
    skip: tuple[SkipKind, str] | None = None


@dataclass
class Site:
    """One forward GEMM and its backward GEMMs (or an unsupported GEMM-like node)."""

    site_id: int
    node: fx.Node
    op: str
    module_path: str
    operand_args: tuple[int, int] = (0, 1)
    roles: tuple[TensorRole, TensorRole] = (TensorRole.ACTIVATION, TensorRole.WEIGHT)
    layouts: tuple[Layout, Layout] = (Layout.PENULTIMATE, Layout.LAST)
    backward: list[BackwardGemm] = field(default_factory=list)
    skip: tuple[SkipKind, str] | None = None
    # filled by select_specs
    fwd_specs: tuple[QuantSpec | None, QuantSpec | None] = (None, None)
    rule: str = ""
    rules: dict = field(default_factory=dict)  # GemmKind -> the Rule that decided it (None: the recipe)

    @property
    def forward_operands(self) -> tuple[fx.Node, fx.Node]:
        return tuple(self.node.args[i] for i in self.operand_args)  # type: ignore[return-value]


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run over one graph."""

    config: FQTConfig
    graph_id: int = 0
    param_indices: frozenset[int] = frozenset()
    sites: list[Site] = field(default_factory=list)
    decisions: list[SiteDecision] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    graph_texts: list[tuple[str, str]] = field(default_factory=list)
    stages: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, text, runnable .py)
    dot: str = ""  # picture of the rewritten graph (debug mode)
    counters: dict[str, int] = field(default_factory=dict)


class FQTPass(abc.ABC):
    """Base class: ``name`` (equal to the module name), ``requires``, ``mutates``, ``run``."""

    name: str = ""
    requires: tuple[str, ...] = ()
    mutates: bool = False

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Analyse or rewrite ``gm`` in place, reading and filling ``ctx``."""
