"""Live numerics monitoring: the paper's statistics measured inside the compiled training step.

    mon = fqt.Monitor(every=100, sinks=["fqt_monitor.jsonl"])
    step = torch.compile(model, backend="fqt", options={"recipe": "int8", "monitor": mon})
    ...train...
    print(mon.table())                       # or: fqt monitor fqt_monitor.jsonl

With a monitor, the backend compiles every training graph twice: as usual, and a *monitored
variant* whose forward and backward graphs carry probes (``passes/monitor_graph.py``). Every
``every``-th call of a graph (from its first) runs the monitored variant; the others run the
plain graph, which has no extra node at all, so monitoring costs only on monitored steps. A
monitored step yields one record per probe, naming the site as the decision table does:

* ``quantizer``: per quantization: shares of codes saturated at the grid's ends, of nonzero
  inputs rounded to zero and of inputs clipped; the scale range; NaN / Inf count;
* ``forward``: per forward GEMM: relative error and SQNR against the same GEMM on the
  high-precision inputs;
* ``gradient``: per weight gradient: the variance its own gradient quantizer adds (a second draw),
  the total quantization variance (the whole backward run twice), the minibatch sampling
  variance (the batch's halves), their ratio, and Theorem 1's bias check over a window.

Records go to the sinks (callables, JSON lines, TensorBoard: ``monitor_sinks``), thresholds
(:class:`Thresholds`) raise alerts that name the site and the rule that would fix it, and an
optional :class:`~fqt_compiler.monitor_policy.AdaptivePolicy` applies such rules itself: the
graphs recompile at their next call, and the log records the change. Inference graphs
(``torch.no_grad``) are not monitored.
"""

from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from .errors import OptionsError
from .monitor_stats import ERROR_FIELDS, GRADIENT_FIELDS, QUANTIZER_FIELDS
from .monitor_sinks import JsonLinesSink, site_table
from .sites import SiteDecision
from .specs import GemmKind, QuantSpec

__all__ = ["Monitor", "Thresholds", "MonitorWarning", "site_name"]


class MonitorWarning(UserWarning):
    """A monitored quantity crossed its threshold (the message names the site and a fix)."""


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """When a record raises an alert. ``None`` turns a check off.

    The defaults hold on the paper's 8-bit recipes (``int8``, ``ptq8``, ``psq8``, ``bhq8``):
    no alert on a healthy model. They flag what breaks training: a forward GEMM off by more than
    25% (``forward_error``), a quantizer clipping more than 1% of its inputs (``clipped``) or
    rounding more than 90% of nonzero forward inputs to zero (``zero``), any NaN / Inf, a
    gradient quantizer adding more variance than the minibatch's own sampling variance
    (``variance_ratio``: Theorem 2 says FQT trains like QAT while this is << 1), and a mean
    deviation from the QAT gradient (``bias_z``: a t-statistic over ``Monitor.window`` steps,
    or any deviation at all from a quantizer without noise)."""

    forward_error: float | None = 0.25
    clipped: float | None = 0.01
    zero: float | None = 0.9
    variance_ratio: float | None = 1.0
    bias_z: float | None = 6.0
    nonfinite: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "nonfinite":
                if not isinstance(value, bool):
                    raise OptionsError(f"Thresholds.nonfinite must be True or False, got {value!r}")
            elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise OptionsError(f"Thresholds.{f.name}={value!r} must be a positive number, or None to turn it off")


def site_name(decision: SiteDecision) -> str:
    """``graph.site``: the site column of the decision table."""
    return f"{decision.graph_id}.{decision.site_id}"


def _sink(s: Any) -> Callable[[dict], None]:
    if isinstance(s, (str, Path)):
        return JsonLinesSink(s)
    if callable(s):
        return s
    raise OptionsError(f"Monitor sink {s!r} is not valid: give a callable taking a record dict, or a path for JSON lines")


class Monitor:
    """Per-site numerics monitoring of compiled training (see the module docstring).

    ``every``: the sampling period in calls of each compiled graph (the first call is monitored);
    ``sinks``: callables taking each record (a dict), or paths of JSON-lines logs;
    ``thresholds``: when to alert; ``policy``: an ``AdaptivePolicy`` applying fixes, or None;
    ``window``: monitored steps in the bias check; ``warn``: emit a :class:`MonitorWarning`
    the first time each (site, quantity) alerts (every alert is logged regardless);
    ``total_variance``: on monitored steps, also run the whole backward a second time, every
    gradient quantizer drawing afresh, for each weight gradient's *total* quantization variance
    (Theorem 2's, what ``fqt_compiler.stats`` measures offline; about one more backward per
    monitored step); ``keep``: records kept in memory (``Monitor.records``).
    """

    def __init__(self, every: int = 100, *, sinks: tuple | list = (), thresholds: Thresholds | None = None,
                 policy: Any = None, window: int = 20, warn: bool = True, total_variance: bool = False,
                 keep: int = 100_000) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise OptionsError(f"Monitor(every={every!r}): the sampling period must be an int >= 1 (calls of each graph)")
        if isinstance(window, bool) or not isinstance(window, int) or window < 3:
            raise OptionsError(f"Monitor(window={window!r}) must be an int >= 3 (monitored steps in the bias check)")
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise OptionsError(f"Monitor(thresholds=...) must be a fqt.Thresholds, got {type(thresholds).__name__}")
        if policy is not None and not (callable(getattr(policy, "fix", None)) and callable(getattr(policy, "describe", None))):
            raise OptionsError(f"Monitor(policy=...) must be a fqt.AdaptivePolicy (or have .fix(alert, monitor) -> Rule | None "
                               f"and .describe(rule) -> str), got {policy!r}")
        if not isinstance(total_variance, bool):
            raise OptionsError(f"Monitor(total_variance={total_variance!r}) must be True or False")
        self.every = every
        self.total_variance = total_variance
        self.sinks = [_sink(s) for s in (sinks if isinstance(sinks, (list, tuple)) else (sinks,))]
        self.thresholds = thresholds or Thresholds()
        self.policy = policy
        self.window = window
        self.warn = warn
        self.records: collections.deque[dict] = collections.deque(maxlen=keep)
        self.alerts: list[dict] = []
        self.rules: tuple = ()  # the policy's rules, ahead of the user's
        self.sites: dict[str, SiteDecision] = {}  # "graph.site" -> its decisions (as compiled last)
        self.generation = 0  # bumped when the policy changes the rules: graphs recompile
        self._warned: set = set()
        self._bias: dict[str, collections.deque] = {}
        self._next_graph = 0

    def __repr__(self) -> str:
        return f"Monitor(every={self.every}, sinks={len(self.sinks)}, policy={self.policy!r}, records={len(self.records)})"

    # ------------------------------------------------------------------ schedule
    def claim_graph_id(self, proposed: int) -> int:
        """A graph number no other graph this monitor watches has: ``proposed`` (the backend's
        own count) unless taken."""
        graph_id = max(proposed, self._next_graph)
        self._next_graph = graph_id + 1
        return graph_id

    def due(self, calls: int) -> bool:
        """Whether a graph's call number ``calls`` (0-based) is a monitored one."""
        return calls % self.every == 0

    # ------------------------------------------------------------------ records
    def emit(self, record: dict) -> None:
        """Keep ``record`` and hand it to every sink."""
        self.records.append(record)
        for sink in self.sinks:
            sink(record)

    def observe(self, kind: str, values: list[float], where: dict) -> None:
        """One probe's vector (``monitor_stats`` fields) as a record, with its alerts."""
        record = {"kind": kind, **where, **_derived(kind, values)}
        if kind == "gradient":
            record.update(self._bias_window(record))
        self.emit(record)
        for alert in self._alerts(record):
            self._raise(alert, record)

    def _bias_window(self, record: dict) -> dict:
        """Theorem 1's check over the last ``window`` monitored steps: a t-statistic of the
        samples w_r (``monitor_stats.gradient_stats``), one per output channel and step: products
        of two independent deviations from the exact gradient, with mean 0 when the quantizer is
        unbiased and mean ||b_r||^2 / (||d_a|| ||d_b||) > 0 under a bias b. Needs 30 samples."""
        key = f"{record['site']}/{record['stage']}"
        window = self._bias.setdefault(key, collections.deque(maxlen=self.window))
        stats = record.pop("_bias_rows")
        if stats[2] > 0:
            window.append(stats)
        total, squares, n = (sum(s[i] for s in window) for i in range(3))
        if n < 30:
            return {"bias_z": None, "bias_samples": int(n)}
        mean = total / n
        var = max(squares - n * mean * mean, 0.0) / (n - 1)
        # identical samples (no spread at all) can only be a deviation without noise: saturate
        z = mean / math.sqrt(var / n) if var > 0 else (1e9 if mean > 0 else 0.0)
        return {"bias_z": z, "bias_samples": int(n)}

    def _alerts(self, r: dict) -> list[dict]:
        t = self.thresholds
        checks = {
            "forward": [("rel_error", t.forward_error)],
            "quantizer": [("clipped", t.clipped)] + ([("zero", t.zero)] if r.get("role") in ("activation", "weight") else []),
            "gradient": [("var_ratio", t.variance_ratio), ("bias_z", t.bias_z)],
        }[r["kind"]]
        out = []
        for quantity, limit in checks:
            value = r.get(quantity)
            if limit is not None and value is not None and math.isfinite(value) and value > limit:
                out.append({"quantity": quantity, "value": value, "threshold": limit})
            if quantity == "bias_z" and r.get("deterministic_bias"):
                out.append({"quantity": "bias", "value": 1.0, "threshold": 0.0})
        if t.nonfinite and r.get("nonfinite"):
            out.append({"quantity": "nonfinite", "value": r["nonfinite"], "threshold": 0})
        return out

    def _raise(self, alert: dict, record: dict) -> None:
        names = ("step", "graph", "site", "module", "gemm", "stage", "role", "spec", "spec_key", "generation")
        where = {k: record[k] for k in names if k in record}
        fix = _suggest(record, alert["quantity"])
        full = {"kind": "alert", **where, **alert, "fix": fix, "message": _message(where, alert, fix)}
        self.alerts.append(full)
        self.emit(full)
        key = (record["site"], record["stage"], record.get("role"), alert["quantity"])
        if self.warn and key not in self._warned:
            self._warned.add(key)
            warnings.warn(full["message"], MonitorWarning, stacklevel=2)
        if self.policy is not None:
            self._apply_policy(full)

    def _apply_policy(self, alert: dict) -> None:
        rule = self.policy.fix(alert, self)
        if rule is None:
            return
        self.rules = (rule, *self.rules)
        self.generation += 1
        self.emit({"kind": "policy", **{k: alert[k] for k in ("step", "graph", "site", "module", "gemm", "stage") if k in alert},
                   "quantity": alert["quantity"], "rule": rule.name, "action": self.policy.describe(rule),
                   "message": f"fqt monitor policy: {rule.name} applied at the next recompile"})

    # ------------------------------------------------------------------ reading
    def table(self) -> str:
        """The per-site table of every record so far (what ``fqt monitor LOG`` prints)."""
        return site_table(list(self.records))

    def clear(self) -> None:
        """Forget records, alerts and the bias windows (the policy's rules stay)."""
        self.records.clear()
        self.alerts.clear()
        self._bias.clear()
        self._warned.clear()


def _ratio(num: float, den: float) -> float | None:
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return None
    return num / den


def _derived(kind: str, v: list[float]) -> dict:
    """The record's quantities from a probe's raw vector."""
    if kind == "quantizer":
        out = dict(zip(QUANTIZER_FIELDS, v))
        out["nonfinite"] = int(out["nonfinite"])
        return {k: (None if k.startswith("scale") and x < 0 else x) for k, x in out.items()}
    if kind == "forward":
        raw = dict(zip(ERROR_FIELDS, v))
        rel = math.sqrt(raw["error_sq"] / raw["ref_sq"]) if raw["ref_sq"] > 0 else None
        sqnr = 10 * math.log10(raw["ref_sq"] / raw["error_sq"]) if raw["error_sq"] > 0 and raw["ref_sq"] > 0 else None
        return {"rel_error": rel, "sqnr_db": sqnr, "nonfinite": int(raw["nonfinite"])}
    raw = {k: (math.nan if x < 0 and k in ("sampling_var", "total_var") else x) for k, x in zip(GRADIENT_FIELDS, v)}
    dev = math.sqrt(raw["dev_a_sq"] * raw["dev_b_sq"])
    # no noise at all but a deviation from the exact gradient: a deterministic (biased) quantizer
    deterministic = raw["own_var"] == 0 and raw["dev_a_sq"] > 1e-12 * max(raw["exact_sq"], 1e-30)
    return {
        "own_var": raw["own_var"], "total_var": None if math.isnan(raw["total_var"]) else raw["total_var"],
        "sampling_var": None if math.isnan(raw["sampling_var"]) else raw["sampling_var"],
        "var_ratio": _ratio(raw["own_var"], raw["sampling_var"]),
        "total_ratio": _ratio(raw["total_var"], raw["sampling_var"]),
        "bias_cos": raw["bias_dot"] / dev if dev > 0 else None, "deterministic_bias": deterministic,
        "_bias_rows": (raw["bias_rows_sum"], raw["bias_rows_sq"], raw["bias_rows"]),
        "nonfinite": int(raw["nonfinite"]),
    }


def _suggest(record: dict, quantity: str) -> str:
    """What would fix the site: in words, as the rule the policy would add."""
    spec = QuantSpec.from_key(record["spec_key"]) if record.get("spec_key") else None
    if record["kind"] == "gradient" or record.get("role") == "grad_output":
        what = "its gradient quantizer"
        if quantity in ("bias", "bias_z"):
            return f"{what}: an unbiased (stochastic-rounding) quantizer, e.g. fqt.recipe('psq8')'s, or high precision"
        return f"{what}: 8 bits (a rule with specs={{'grad_weight.grad_output': ..., 'grad_input.grad_output': ...}}), " \
               "or high precision"
    role = record.get("role") or "activation and weight"
    if spec is not None and spec.quantizer is not None:
        return f"its {role} quantizer: a built-in min-max quantizer (no clipping), e.g. the int8 recipe's, or high precision"
    return f"its {role} quantizer: more bits, or high precision (a rule with high_precision=...)"


def _message(where: dict, alert: dict, fix: str) -> str:
    role = f" {where['role']}" if where.get("role") else ""
    return (f"fqt monitor: site {where['site']} ({where.get('module') or '<no module>'}, {where['gemm']}{role}, "
            f"{where['stage']}) at step {where['step']}: {alert['quantity']} = {alert['value']:.4g} > {alert['threshold']:.4g}. "
            f"Fix: {fix}")


def record_where(decision: SiteDecision | None, graph_id: int, site_id: int, gemm: GemmKind, stage: str, step: int) -> dict:
    """The fields naming a record's site, as the decision table does."""
    return {"step": step, "graph": graph_id, "site": f"{graph_id}.{site_id}",
            "module": decision.module_path if decision is not None else "", "op": decision.op if decision is not None else "",
            "gemm": gemm.value, "stage": stage}
