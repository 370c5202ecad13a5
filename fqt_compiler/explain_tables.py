"""The text tables of an ``explain`` report: the per-GEMM decision table (120 columns by
default, every column with ``wide=True``) and a per-op summary with the quantized FLOPs share."""

from __future__ import annotations

import textwrap
from collections import defaultdict

from tabulate import tabulate

from .sites import GemmDecision, GemmStatus, OperandSource, SiteDecision

__all__ = ["decision_table", "summary_table", "wrap", "WIDTH"]

WIDTH = 120  # the default tables fit this many columns


def _operands(g: GemmDecision) -> str:
    parts = []
    for o in g.operands:
        spec = o.spec.short() if o.spec is not None else "hp"
        note = "" if o.source in (OperandSource.QUANTIZED, OperandSource.HIGH_PRECISION) else f" ({o.source})"
        parts.append(f"{o.role.value}: {spec}{note}")
    return "; ".join(parts) or "-"


def _error(errors: dict, s: SiteDecision, g: GemmDecision) -> str:
    e = errors.get((s.graph_id, s.site_id)) if g.kind.value == "output" else None
    return f"{e:.2g}" if e is not None else "-"


def _narrow_status(g: GemmDecision) -> str:
    """The status with its reason where it is not a low-bit kernel (which kernel: wide view)."""
    return g.status.value if g.status is GemmStatus.LOWBIT_KERNEL else g.label


def decision_table(rows: list[tuple[SiteDecision, GemmDecision]], errors: dict, wide: bool = False) -> str:
    """One row per GEMM. ``fwd err``: the site's relative forward error against high precision
    where it was measured (``forward_error.py``). Narrow: long cells wrap to fit ``WIDTH``."""
    if wide:
        headers = ["graph", "site", "module", "op", "gemm", "shape", "GFLOP", "operands", "rule", "status", "fwd err"]
        body = [[s.graph_id, s.site_id, s.module_path, s.op, g.kind.value, g.shape, f"{g.flops / 1e9:.3g}", _operands(g), g.rule,
                 g.label, _error(errors, s, g)] for s, g in rows]
        return tabulate(body, headers=headers, tablefmt="simple")
    headers = ["site", "module", "op", "gemm", "shape", "GFLOP", "status", "fwd err"]
    body = [[f"{s.graph_id}.{s.site_id}", s.module_path, s.op.removeprefix("aten."), g.kind.value, g.shape,
             f"{g.flops / 1e9:.3g}", _narrow_status(g), _error(errors, s, g)] for s, g in rows]
    return tabulate(
        body, headers=headers, tablefmt="simple", maxcolwidths=[None, 20, 12, None, 14, None, 26, None], disable_numparse=True
    )


def summary_table(sites: list[SiteDecision]) -> str:
    """GEMMs and FLOPs per op and status, with each op's share of FLOPs that is quantized."""
    stats: dict[str, dict] = defaultdict(lambda: {"gemms": 0, "flops": 0, "quantized": 0, "lowbit": 0})
    for s in sites:
        for g in s.gemms:
            row = stats[s.op.removeprefix("aten.")]
            row["gemms"] += 1
            row["flops"] += g.flops
            if g.quantized:
                row["quantized"] += g.flops
                row["lowbit"] += g.flops if g.status is GemmStatus.LOWBIT_KERNEL else 0
    body = [[op, r["gemms"], f"{r['flops'] / 1e9:.3g}", f"{100 * r['quantized'] / r['flops']:.0f}%" if r["flops"] else "-",
             f"{100 * r['lowbit'] / r['flops']:.0f}%" if r["flops"] else "-"] for op, r in sorted(stats.items())]
    return tabulate(body, headers=["op", "GEMMs", "GFLOP", "quantized", "on low-bit kernels"], tablefmt="simple") if body else ""


def wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, WIDTH, subsequent_indent="  "))
