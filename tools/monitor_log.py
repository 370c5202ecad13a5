"""``fqt monitor LOG``: the per-site table, the alerts and plots of a monitor's JSON-lines log.

    fqt monitor fqt_monitor.jsonl                    # per-site table, then every alert and policy change
    fqt monitor fqt_monitor.jsonl --plot curves.png  # forward error and variance ratio over steps
    fqt monitor fqt_monitor.jsonl --site 0.1         # one site's records, step by step

The log is what ``fqt.Monitor(sinks=["fqt_monitor.jsonl"])`` (or ``fqt.JsonLinesSink``) wrote;
the table is ``Monitor.table()``'s.
"""

from __future__ import annotations

from tabulate import tabulate

from fqt_compiler.monitor_sinks import plot_log, read_log, site_table

__all__ = ["render", "site_steps"]

_STEP_FIELDS = {
    "forward": ("rel_error", "sqnr_db"),
    "quantizer": ("saturated", "zero", "clipped", "scale_min", "scale_max"),
    "gradient": ("own_var", "total_var", "sampling_var", "var_ratio", "bias_z"),
}


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def site_steps(records: list[dict], site: str) -> str:
    """Every record of one site (``graph.site``), one row each, in step order."""
    rows = []
    for r in sorted((r for r in records if r.get("site") == site), key=lambda r: (r.get("step", 0), r["kind"])):
        fields = _STEP_FIELDS.get(r["kind"], ("quantity", "value", "message"))
        detail = ", ".join(f"{f}={_fmt(r.get(f))}" for f in fields if f in r)
        rows.append([r.get("step"), r["kind"], r.get("gemm", ""), r.get("role", ""), r.get("stage", ""), detail])
    if not rows:
        known = sorted({r["site"] for r in records if "site" in r})
        return f"(no records of site {site}; the log has sites {', '.join(known) or 'none'})"
    return tabulate(rows, headers=["step", "kind", "gemm", "role", "stage", "values"], tablefmt="simple", disable_numparse=True)


def render(path: str, plot: str | None = None, site: str | None = None) -> str:
    """The text ``fqt monitor`` prints for the log at ``path`` (and the plot it writes)."""
    records = read_log(path)
    if site is not None:
        return site_steps(records, site)
    steps = sorted({r["step"] for r in records if "step" in r})
    head = f"fqt monitor log {path}: {len(records)} records, {len(steps)} monitored steps"
    if steps:
        head += f" ({steps[0]} .. {steps[-1]})"
    out = [head, "", site_table(records)]
    events = [r for r in records if r["kind"] in ("alert", "policy")]
    if events:
        out += ["", f"alerts and policy changes ({len(events)}):"]
        out += [f"  step {r.get('step')}: {r.get('message', '')}" for r in events[:50]]
        if len(events) > 50:
            out.append(f"  ... {len(events) - 50} more (fqt monitor LOG --site G.S lists one site's)")
    else:
        out += ["", "no alerts"]
    if plot:
        out += ["", f"plot: {plot_log(records, plot)}"]
    return "\n".join(out)
