"""Where monitor records go, and how a log reads back: JSON lines, TensorBoard, the per-site table.

A record is a flat dict (``fqt_compiler.monitor``): ``kind`` (``quantizer``, ``forward``,
``gradient``, ``alert``, ``policy``), ``step``, the site's names (``site`` = ``graph.site`` as in
the decision table, ``module``, ``gemm``, ``stage``, ``role`` for quantizers) and its quantities.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

from .errors import OptionsError

__all__ = ["JsonLinesSink", "TensorBoardSink", "read_log", "site_table", "plot_log"]


class JsonLinesSink:
    """Appends every record to ``path`` as one JSON object per line (flushed per monitored step
    and on every alert, so a crashed run keeps what it measured)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def __call__(self, record: dict) -> None:
        self._file.write(json.dumps(_finite(record), allow_nan=False, default=_plain) + "\n")
        if record["kind"] in ("alert", "policy", "gradient"):
            self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"JsonLinesSink({str(self.path)!r})"


def _plain(value: object) -> object:
    return str(value)


def _finite(value: object) -> object:
    """JSON has no NaN / Inf: a quantity that came out non-finite (a NaN gradient, say) is written
    as null; the record's ``nonfinite`` count says why."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class TensorBoardSink:
    """Writes every numeric quantity of every record as a TensorBoard scalar,
    ``fqt/<kind>/<quantity>/<site> <module> <gemm> [<role>]``, at the record's step. Needs the
    ``tensorboard`` package (``pip install fqt-compiler[tensorboard]``)."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise OptionsError("TensorBoardSink needs the tensorboard package: pip install tensorboard") from exc
        self.writer = SummaryWriter(str(log_dir))

    def __call__(self, record: dict) -> None:
        if record["kind"] in ("alert", "policy"):
            self.writer.add_text(f"fqt/{record['kind']}", record.get("message", ""), record.get("step", 0))
            return
        tag = " ".join(str(record.get(k)) for k in ("site", "module", "gemm", "role") if record.get(k))
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "graph"):
                if math.isfinite(value):
                    self.writer.add_scalar(f"fqt/{record['kind']}/{key}/{tag}", value, record["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_log(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log; a line that is not a record raises, naming it."""
    out = []
    if not Path(path).is_file():
        raise OptionsError(f"no monitor log at {path}: give the path a JsonLinesSink (or Monitor(sinks=[path])) wrote")
    with Path(path).open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OptionsError(f"{path}:{i} is not a JSON record ({exc.msg}); is it an fqt monitor log?") from None
            if not isinstance(record, dict) or "kind" not in record:
                raise OptionsError(f"{path}:{i} has no 'kind': not an fqt monitor record")
            out.append(record)
    return out


def _mean(values: list) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _fmt(value: float | None, digits: str = ".3g") -> str:
    return "-" if value is None else format(value, digits)


def _site_key(r: dict) -> tuple:
    return (r.get("graph", 0), int(str(r.get("site", "0.0")).split(".")[-1]), r.get("module", ""))


def site_table(records: list[dict]) -> str:
    """One row per site: mean forward error and SQNR, the worst shares of its forward operands'
    quantizers (saturated, rounded to zero) and of any of its quantizers (clipped), mean variances
    and their ratio, the last bias z, and the alerts raised (with the quantities that raised them)."""
    by_site: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["kind"] in ("forward", "quantizer", "gradient", "alert", "policy"):
            by_site[_site_key(r)][r["kind"]].append(r)
    rows = []
    for key in sorted(by_site):
        k = by_site[key]
        fwd, quant, grad = k["forward"], k["quantizer"], k["gradient"]
        alerts = sorted({a["quantity"] for a in k["alert"]})
        fwd_quant = [r for r in quant if r.get("role") in ("activation", "weight")]
        worst = lambda q, rs=quant: max((r[q] for r in rs if r.get(q) is not None), default=None)  # noqa: E731
        bias = [r.get("bias_z") for r in grad if r.get("bias_z") is not None]
        rows.append([
            f"{key[0]}.{key[1]}", key[2] or "-", len({r["step"] for r in fwd + quant + grad}),
            _fmt(_mean([r.get("rel_error") for r in fwd])), _fmt(_mean([r.get("sqnr_db") for r in fwd]), ".1f"),
            _fmt(worst("saturated", fwd_quant)), _fmt(worst("zero", fwd_quant)), _fmt(worst("clipped")),
            _fmt(_mean([r.get("own_var") for r in grad])), _fmt(_mean([r.get("sampling_var") for r in grad])),
            _fmt(_mean([r.get("var_ratio") for r in grad])), _fmt(bias[-1] if bias else None, "+.2f"),
            (", ".join(f"{q} x{sum(a['quantity'] == q for a in k['alert'])}" for q in alerts) or "-")
            + (" (policy: fixed)" if k["policy"] else ""),
        ])
    head = ["site", "module", "steps", "fwd rel err", "SQNR dB", "fwd saturated", "fwd zero", "clipped", "own quant var",
            "sampling var", "quant/sampling", "bias z", "alerts"]
    return tabulate(rows, headers=head, tablefmt="simple", disable_numparse=True) if rows else "(no monitor records)"


def plot_log(records: list[dict], path: str | Path) -> Path:
    """Forward error and gradient variance ratio over steps, one line per site, to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OptionsError("plots need matplotlib: pip install matplotlib") from exc
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, quantity, title in ((axes[0], "forward", "rel_error", "forward relative error"),
                                      (axes[1], "gradient", "var_ratio", "quantization / sampling variance")):
        series: dict[str, list] = defaultdict(list)
        for r in records:
            if r["kind"] == kind and r.get(quantity) is not None:
                series[f"{r['site']} {r.get('module', '')}"].append((r["step"], r[quantity]))
        for label, points in sorted(series.items()):
            ax.plot(*zip(*sorted(points)), marker=".", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        if series:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
