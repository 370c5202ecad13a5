"""What the backend did to each graph: one :class:`GraphRecord` per graph Dynamo compiled."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .sites import GemmStatus, SiteDecision
from .specs import GemmKind

__all__ = ["GraphRecord", "PENDING", "NOT_IN_GRAPH"]

#: The reason a kernels-mode GEMM carries until its graph has compiled.
PENDING = "pending: its graph has not compiled yet (the backward compiles at the first backward call)"
#: ... and once its graph has compiled without it (the partitioner's common-subexpression
#: elimination merges a GEMM computed twice from the same operands, e.g. a module called twice
#: on one input; dead-code elimination drops one whose result nothing reads).
NOT_IN_GRAPH = ("not in the compiled graph: removed before lowering, as a duplicate of an identical GEMM (which computes "
                "its result) or as unused")


@dataclass
class GraphRecord:
    """What the backend did to one graph Dynamo handed it."""

    graph_id: int
    kind: str = ""  # "joint" or "inference"
    decisions: list[SiteDecision] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    graph_texts: list[tuple[str, str]] = field(default_factory=list)
    stages: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, text, runnable .py)
    dot: str = ""  # Graphviz picture of the rewritten joint graph
    counters: dict[str, int] = field(default_factory=dict)
    kernel_sources: dict[str, str] = field(default_factory=dict)  # generated code per kernel / graph
    fused: list = field(default_factory=list)  # codegen.FusedQuantize / FusedEpilogue: generated fused kernels
    layouts: list = field(default_factory=list)  # codegen.LayoutChoice: codes in the order their GEMMs read K-major
    launches: list = field(default_factory=list)  # codegen.launches.KernelLaunches: what one call launches, per stage

    def mark_pending(self) -> None:
        """Say, on every GEMM the kernels stage has yet to lower, that it has not run yet: a
        graph's GEMMs are lowered when that graph compiles, and AOTAutograd compiles the
        backward at the first backward call (until then its GEMMs read "simulated")."""
        self.decisions = [
            replace(site, gemms=tuple(
                replace(g, reason=PENDING) if g.status is GemmStatus.SIMULATED and not g.reason else g for g in site.gemms
            ))
            for site in self.decisions
        ]

    def apply_lowering(self, lowered: list, backward: bool | None = None) -> None:
        """Fold codegen's per-GEMM results (``fqt_compiler.codegen.LoweredGemm``) into the
        decisions. ``backward``: which graph was compiled (True: the backward, False: the forward
        or inference graph); its GEMMs that are still pending were not in it (``NOT_IN_GRAPH``)."""
        by_key = {(r.site_id, r.gemm): r for r in lowered}
        updated = []
        for site in self.decisions:
            gemms = []
            for g in site.gemms:
                r = by_key.get((site.site_id, g.kind))
                if r is not None and g.status is not GemmStatus.SKIPPED:
                    g = replace(g, status=r.status, reason=r.reason, kernel=r.kernel)
                elif g.reason == PENDING and backward is not None and (g.kind is not GemmKind.OUTPUT) == backward:
                    g = replace(g, reason=NOT_IN_GRAPH)
                gemms.append(g)
            updated.append(replace(site, gemms=tuple(gemms)))
        self.decisions = updated
