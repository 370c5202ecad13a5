"""Adaptive precision per site: the monitor's alerts turned into placement rules.

An :class:`AdaptivePolicy` answers each alert with a :class:`~fqt_compiler.rules.Rule` for the
alerting site's module, ahead of every user rule, applied when the graphs recompile at their
next call (``Monitor.generation``). Per site and side (the forward operands, the gradient
quantizer) it climbs a ladder, one rung per alert that persists after the previous fix:

* gradient alerts (quantization variance above the minibatch's sampling variance, a bias, NaN):
  a biased or custom gradient quantizer becomes the built-in stochastic-rounding one at 8 bits;
  fewer than 8 bits become 8 bits; then the site's backward GEMMs go to high precision;
* forward alerts (forward error, clipping, inputs rounded to zero, NaN): a custom quantizer
  becomes the built-in min-max one at 8 bits (it never clips); fewer bits become 8; then the
  site's forward GEMM goes to high precision.

In the spirit of per-layer precision switching driven by measured gradient statistics (the
quantities of Theorem 2), with the variance estimates this project already computes.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import OptionsError
from .rules import Rule
from .sites import SiteDecision
from .specs import GemmKind, QuantSpec, Rounding, TensorRole

__all__ = ["AdaptivePolicy"]

_GRAD_GEMMS = (GemmKind.GRAD_INPUT, GemmKind.GRAD_WEIGHT)


def _side(alert: dict) -> str:
    return "backward" if alert.get("role") == TensorRole.GRAD_OUTPUT.value else "forward"


def _better(spec: QuantSpec | None, side: str) -> QuantSpec | None:
    """One rung up from ``spec``; None: nothing but high precision is left."""
    if spec is None:
        return None
    if spec.quantizer is not None or (side == "backward" and not spec.is_stochastic):
        rounding = Rounding.STOCHASTIC if side == "backward" else Rounding.NEAREST
        base = spec.with_(quantizer=None, transform="none", rounding=rounding, bits=8, format="int",
                          granularity="row" if spec.granularity.value == "block" else spec.granularity, block_size=None,
                          scheme="sym")
        return base
    if not spec.format.is_float and spec.bits < 8:
        return spec.with_(bits=8)
    return None


class AdaptivePolicy:
    """Fix alerting sites by rules, climbing a ladder (see the module docstring).

    ``max_fixes``: the most rules it adds in one run (then it only logs); ``quantities``: the
    alert quantities it acts on (default: all)."""

    def __init__(self, max_fixes: int = 8, quantities: tuple[str, ...] | None = None) -> None:
        if isinstance(max_fixes, bool) or not isinstance(max_fixes, int) or max_fixes < 1:
            raise OptionsError(f"AdaptivePolicy(max_fixes={max_fixes!r}) must be an int >= 1")
        self.max_fixes = max_fixes
        self.quantities = None if quantities is None else tuple(quantities)
        self.fixes: list[Rule] = []
        self._applied: dict[tuple[str, str], tuple[int, QuantSpec | None]] = {}  # (module, side) -> (generation, spec)

    def __repr__(self) -> str:
        return f"AdaptivePolicy(max_fixes={self.max_fixes}, fixes={len(self.fixes)})"

    def fix(self, alert: dict, monitor: Any) -> Rule | None:
        """A rule answering ``alert``, or None (nothing to do, a stale alert, or out of fixes)."""
        if self.quantities is not None and alert["quantity"] not in self.quantities:
            return None
        site: SiteDecision | None = monitor.sites.get(alert["site"])
        module = alert.get("module") or ""
        if site is None or not module or len(self.fixes) >= self.max_fixes:
            return None
        side = _side(alert)
        done = self._applied.get((module, side))
        if done is not None and alert.get("generation", 0) <= done[0]:
            return None  # measured before the last fix took effect
        rule = self._rule(site, module, side, alert)
        self.fixes.append(rule)
        self._applied[(module, side)] = (monitor.generation + 1, None)
        return rule

    def _rule(self, site: SiteDecision, module: str, side: str, alert: dict) -> Rule:
        kinds = _GRAD_GEMMS if side == "backward" else (GemmKind.OUTPUT,)
        pattern = f"re:^{re.escape(module)}$"
        specs: dict[str, QuantSpec | None] = {}
        upgraded = False
        for g in site.gemms:
            if g.kind not in kinds:
                continue
            for o in g.operands:
                spec = o.spec
                target = TensorRole.GRAD_OUTPUT if side == "backward" else alert.get("role")
                if spec is not None and (target is None or o.role.value == getattr(target, "value", target)):
                    better = _better(spec, side)
                    if better is None:
                        continue
                    spec, upgraded = better, True
                specs[f"{g.kind.value}.{o.role.value}"] = spec
        name = f"monitor: {module} {side} ({alert['quantity']})"
        if not upgraded:
            return Rule(name=name, module=pattern, gemm=tuple(k.value for k in kinds),
                        high_precision=f"monitor policy: {alert['quantity']} alert at step {alert.get('step')}")
        return Rule(name=name, module=pattern, gemm=tuple(k.value for k in kinds), specs=specs)

    @staticmethod
    def describe(rule: Rule) -> str:
        """The rule's action in words (for the log)."""
        if rule.high_precision is not None:
            return f"high precision for the {'/'.join(rule.gemm)} GEMMs"
        parts = [f"{k}: {s.short() if s is not None else 'hp'}" for k, s in rule.specs.items()]
        return "; ".join(parts)
