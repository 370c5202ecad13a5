"""What the backend did to each graph: one :class:`GraphRecord` per graph Dynamo compiled."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .sites import GemmStatus, SiteDecision

__all__ = ["GraphRecord"]


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

    def apply_lowering(self, lowered: list) -> None:
        """Fold codegen's per-GEMM results (``fqt_compiler.codegen.LoweredGemm``) into the decisions."""
        by_key = {(r.site_id, r.gemm): r for r in lowered}
        updated = []
        for site in self.decisions:
            gemms = []
            for g in site.gemms:
                r = by_key.get((site.site_id, g.kind))
                if r is not None and g.status is not GemmStatus.SKIPPED:
                    g = replace(g, status=r.status, reason=r.reason, kernel=r.kernel)
                gemms.append(g)
            updated.append(replace(site, gemms=tuple(gemms)))
        self.decisions = updated
