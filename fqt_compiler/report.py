"""The per-GEMM report of compiled graphs: the decision table, the per-op summary, coverage,
the fused kernels, and everything a dump writes.

Below the backend on purpose: a backend with ``FQT_DUMP_DIR`` set writes this report after
every compile, and ``explain`` builds one after measuring a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

from .coverage import Coverage
from .dump import write_report
from .explain_tables import decision_table, summary_table, wrap
from .records import GraphRecord
from .sites import GemmDecision, GemmStatus, SiteDecision

__all__ = ["ExplainReport"]


@dataclass
class ExplainReport:
    """The per-GEMM decision table of one ``explain`` call; ``str(report)`` is the table."""

    recipe: str
    records: list[GraphRecord] = field(default_factory=list)
    coverage: Coverage | None = None  # the quantized share of one step's GEMM FLOPs (``explain`` measures it)
    forward_errors: dict = field(default_factory=dict)  # (graph, site) -> relative forward error vs high precision

    @property
    def sites(self) -> list[SiteDecision]:
        return [d for r in self.records for d in r.decisions]

    def rows(self) -> list[tuple[SiteDecision, GemmDecision]]:
        return [(s, g) for s in self.sites for g in s.gemms]

    def write(self, out_dir) -> list[str]:
        """Write the full report (table, per-stage graphs as text and runnable .py, picture,
        kernel sources) under ``out_dir``; returns what was written, one line each."""
        return write_report(self.records, self.recipe, self.render(wide=True), out_dir)

    def kernel_sources(self) -> dict[str, str]:
        """Generated code of the compiled graphs (Inductor) and the fqt Triton kernels they call."""
        return {k: v for r in self.records for k, v in r.kernel_sources.items()}

    def counts(self) -> dict[str, int]:
        """Number of GEMMs per status (``simulated``, ``lowbit-kernel``, ``skipped``)."""
        out = {s.value: 0 for s in GemmStatus}
        for _, g in self.rows():
            out[g.status.value] += 1
        return out

    def table(self, wide: bool = False) -> str:
        """The decision table: 120 columns (long cells wrapped); ``wide=True`` adds every
        operand's spec and the deciding rule, unwrapped."""
        return decision_table(self.rows(), self.forward_errors, wide)

    def summary(self) -> str:
        """GEMMs and FLOPs per op, with the share quantized and on low-bit kernels."""
        return summary_table(self.sites)

    def fusion_table(self) -> str:
        """One row per generated fused kernel: what it absorbed (kernels mode, ``fusion``)."""
        body = []
        for r in self.records:
            for f in r.fused:
                kind = "prologue (quantize)" if hasattr(f, "writes_hp") else "epilogue (GEMM)"
                extra = " + writes the high-precision value" if getattr(f, "writes_hp", False) else ""
                ops = ", ".join(o.removeprefix("aten.").removesuffix(".default") for o in f.ops)
                body.append([r.graph_id, f.stage, f.node, kind, ops + extra])
            for c in r.layouts:
                order = "column-major" if c.layout.name == "COLUMN_MAJOR" else "natural + column-major (one kernel)"
                body.append([r.graph_id, c.stage, c.node, "codes layout", f"{order}: K-major for {', '.join(c.readers)}"])
        return (
            tabulate(body, headers=["graph", "stage", "node", "fused kernel", "absorbed ops"], tablefmt="simple") if body else ""
        )

    def launch_table(self) -> str:
        """What one call of each compiled graph launches: device kernels (of which fqt's Triton
        kernels launched by Inductor itself), library calls, and ``fqt::`` ops left as Python
        calls with the reason each stayed one."""
        body = []
        for r in self.records:
            for launch in r.launches:
                why = "; ".join(sorted({reason for _, reason in launch.python_calls}))
                body.append([r.graph_id, launch.stage, launch.kernels, launch.fqt_kernels, launch.library,
                             len(launch.python_calls), why])
        headers = ["graph", "stage", "kernels", "fqt kernels (Inductor-launched)", "library calls", "fqt Python calls", "why"]
        return tabulate(body, headers=headers, tablefmt="simple") if body else ""

    def __str__(self) -> str:
        return self.render(wide=False)

    def render(self, wide: bool = False) -> str:
        """The report as text: counts, coverage, the per-op summary and the decision table."""
        c = self.counts()
        counts = ", ".join(f"{v} {k}" for k, v in c.items())
        parts = [wrap(f"fqt explain (recipe {self.recipe}): {len(self.sites)} GEMM sites, {counts}")]
        if self.coverage is not None:
            parts.append(wrap(self.coverage.summary()))
        if len(self.sites) > 8:  # a summary where the table is long
            parts += ["", self.summary(), ""]
        parts.append(self.table(wide))
        fusion = self.fusion_table()
        text = "\n".join(parts) + (f"\n\ngenerated fused kernels (sources under kernels/):\n{fusion}" if fusion else "")
        launches = self.launch_table() if wide else ""
        return text + (f"\n\nlaunches per call of each compiled graph:\n{launches}" if launches else "")
