"""The monitor at run time: which variant a call runs, and the probes' vectors turned into records.

:class:`MonitoredGraph` stands where Dynamo expects the backend's compiled function. It holds two
AOTAutograd compilations of the same graph, plain and monitored, and runs the monitored one on
the calls the :class:`~fqt_compiler.monitor.Monitor` samples. Each variant is a complete
autograd function, so a monitored forward is always followed by its own monitored backward.
When the monitor's policy changes the rules, both are rebuilt at the next call, in the tracing
context Dynamo compiled them in (so dynamic shapes stay dynamic).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from .monitor import Monitor, record_where
from fqt_compiler.passes.monitor_graph import Probe, ProbeKind
from .sites import SiteDecision
from .specs import GemmKind, QuantSpec, TensorRole

__all__ = ["GraphWatch", "MonitoredGraph"]


class GraphWatch:
    """One monitored variant: its probes per stage, the sites they name, the step being measured."""

    def __init__(self, monitor: Monitor, graph_id: int) -> None:
        self.monitor = monitor
        self.graph_id = graph_id
        self.decisions: dict[int, SiteDecision] = {}
        self.step = 0
        self.generation = monitor.generation  # of the rules it was compiled with

    def set_decisions(self, decisions: list[SiteDecision]) -> None:
        """The sites of the compiled graph (names for the records; what the policy edits)."""
        self.decisions = {d.site_id: d for d in decisions}
        for d in decisions:
            self.monitor.sites[f"{self.graph_id}.{d.site_id}"] = d

    def wrap(self, fn: Callable, stage: str, probes: list[Probe]) -> Callable:
        """``fn`` (a boxed compiled graph with the probes' vectors as its last outputs) returning
        its own outputs only, after reporting the vectors."""
        if not probes:
            return fn
        extra = len(probes)

        def run(args: list) -> Any:
            outs = fn(args)
            keep = len(outs) - extra
            vectors = outs[keep:]
            flat = torch.cat(list(vectors)).tolist()  # one device-to-host copy for the whole step
            bounds = [0]
            for v in vectors:
                bounds.append(bounds[-1] + v.numel())
            self.report(probes, [flat[lo:hi] for lo, hi in zip(bounds, bounds[1:])])
            return outs[:keep] if isinstance(outs, list) else tuple(outs[:keep])

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def report(self, probes: list[Probe], vectors: list[list[float]]) -> None:
        for probe, values in zip(probes, vectors):
            site = self.decisions.get(probe.site_id)
            where = record_where(site, self.graph_id, probe.site_id, probe.gemm, probe.stage, self.step)
            where["generation"] = self.generation
            if probe.kind is ProbeKind.QUANTIZER:
                where.update(role=probe.role.value, spec=_short(probe.spec), spec_key=probe.spec)
            elif probe.kind is ProbeKind.FORWARD and site is not None:
                where["specs"] = {o.role.value: o.spec.short() if o.spec else "hp" for g in site.gemms
                                  if g.kind is GemmKind.OUTPUT for o in g.operands}
            elif probe.kind is ProbeKind.GRADIENT:
                key = _grad_spec(site)
                where.update(role=TensorRole.GRAD_OUTPUT.value, spec=_short(key), spec_key=key)
            if probe.note:
                where["note"] = probe.note
            self.monitor.observe(probe.kind.value, values, where)


def _short(key: str) -> str:
    return QuantSpec.from_key(key).short() if key else ""


def _grad_spec(site: SiteDecision | None) -> str:
    """The spec key of the site's weight-gradient ``grad_output`` operand."""
    if site is None:
        return ""
    for g in site.gemms:
        if g.kind is GemmKind.GRAD_WEIGHT:
            for o in g.operands:
                if o.role is TensorRole.GRAD_OUTPUT and o.spec is not None:
                    return o.spec.key()
    return ""


class MonitoredGraph:
    """Dynamo's compiled function for one graph under a monitor (see the module docstring).

    ``build(monitored)`` compiles a variant: None for the plain one, a :class:`GraphWatch` for
    the monitored one (the backend's compile steps instrument its graphs and wrap them)."""

    def __init__(self, monitor: Monitor, graph_id: int, build: Callable[[GraphWatch | None], Callable]) -> None:
        self.monitor = monitor
        self.graph_id = graph_id
        self._build = build
        self._context = torch._guards.TracingContext.try_get()
        self.calls = 0
        self.rebuilds = 0
        self._compile()

    def _compile(self) -> None:
        context = torch._guards.tracing(self._context) if self._context is not None else contextlib.nullcontext()
        with context:
            self.plain = self._build(None)
            self.watch = GraphWatch(self.monitor, self.graph_id)
            self.monitored = self._build(self.watch)
        self.generation = self.monitor.generation

    def __call__(self, *args: Any) -> Any:
        if self.generation != self.monitor.generation:  # the policy changed the rules: recompile
            self._compile()
            self.rebuilds += 1
        step = self.calls
        self.calls += 1
        if not torch.is_grad_enabled() or not self.monitor.due(step):
            return self.plain(*args)
        self.watch.step = step
        return self.monitored(*args)
