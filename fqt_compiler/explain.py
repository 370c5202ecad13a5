"""``fqt.explain``: compile a model with the fqt backend and report what happened to every GEMM."""

from __future__ import annotations

import copy
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tabulate import tabulate

from .backend import FQTBackend, GraphRecord
from .config import FQTConfig
from .coverage import Coverage, DynamoSnapshot
from .errors import FQTError
from .explain_tables import decision_table, summary_table, wrap
from .forward_error import forward_errors
from .flops import step_flops
from .sites import GemmDecision, GemmStatus, SiteDecision

__all__ = ["ExplainReport", "explain"]


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
        from .dump import write_report

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
        return tabulate(body, headers=["graph", "stage", "node", "fused kernel", "absorbed ops"], tablefmt="simple") if body else ""

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
        text = "\n".join(parts)
        return text + (f"\n\ngenerated fused kernels (sources under kernels/):\n{fusion}" if fusion else "")


def _progress_printer() -> Callable[[str], None]:
    start = time.perf_counter()

    def say(line: str) -> None:
        print(f"fqt explain [{time.perf_counter() - start:6.1f} s] {line}", file=sys.stderr, flush=True)

    return say


def _call(model: Any, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


def explain(
    model: torch.nn.Module, *example_inputs: Any, recipe: Any = None, kwargs: dict | None = None, progress: bool = True,
    forward_error: bool = True, **options: Any,
) -> ExplainReport:
    """Compile ``model`` with the fqt backend, run one forward pass on ``example_inputs`` (and
    keyword inputs ``kwargs``: ``explain(hf_model, kwargs=batch)`` for ``model(**batch)``),
    with autograd on so the joint forward-backward graph is traced and the backward compiled,
    and report every GEMM site.

    Options are the backend's. ``inductor`` defaults to False here, as in ``fqt inspect``: the
    decisions and the fused kernels do not depend on it, and a large model compiles in seconds
    instead of minutes (pass ``inductor=True`` for Inductor's generated code in the report).
    ``progress`` prints one line per compile step to stderr. ``forward_error`` measures each
    Linear / convolution site's relative output error against high precision (the ``fwd err``
    column; ``forward_error.py``). The model's state (parameters,
    buffers such as BatchNorm statistics) and the RNG state are restored afterwards; no
    backward pass is run.
    """
    from .distributed import sharded_modules

    if isinstance(model, torch.nn.Module) and sharded_modules(model):
        raise FQTError(
            "explain: the model is fully_shard-ed (FSDP2); Dynamo does not trace through FSDP2's hooks, "
            "so nothing would be compiled. Explain the unsharded model (same code, before fully_shard) instead"
        )
    if recipe is not None:
        options["recipe"] = recipe
    options.setdefault("debug", True)  # explain keeps every stage's graph for the report
    options.setdefault("inductor", False)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise FQTError(f"explain: kwargs must be a dict of keyword inputs, got {type(kwargs).__name__}")
    be = FQTBackend(FQTConfig.from_options(options))
    if progress:
        be.progress = _progress_printer()
        be.progress(f"explaining {type(model).__name__} (recipe {be.config.recipe.name}, {be.config.execution.value} execution, "
                    f"Inductor {'on' if be.config.inductor else 'off'})")
    # A fresh code object per call gives Dynamo a fresh cache: explaining many models (or one
    # model under many recipes) never runs into the recompile limit or reuses another backend.
    fresh = types.FunctionType(_call.__code__.replace(), _call.__globals__, "fqt_explain_call")
    state = copy.deepcopy(model.state_dict()) if isinstance(model, torch.nn.Module) else None
    devices = [t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"]
    # compile the backward at once (it is otherwise compiled at the first backward call), so
    # the report has the codegen decisions of the backward GEMMs too
    before = DynamoSnapshot.take()
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch._functorch.config.patch(
        force_non_lazy_backward_lowering=True
    ):
        # static shapes: the report shows the shapes of these inputs, not Dynamo's symbols
        torch.compile(fresh, backend=be, dynamic=False)(model, *example_inputs, **(kwargs or {}))
    dynamo = DynamoSnapshot.take().since(before)
    eager, error = 0, ""
    try:
        with torch.random.fork_rng(devices=devices):
            eager = step_flops(model, example_inputs, kwargs)  # the ground truth: what one eager step computes
    except Exception as exc:  # the model's own eager step failing is reported, not raised: the table stands
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    report = ExplainReport(recipe=be.config.recipe.name, records=list(be.records))
    if forward_error:
        with torch.random.fork_rng(devices=devices):
            report.forward_errors = forward_errors(model, example_inputs, kwargs, report.sites)
    if state is not None:
        model.load_state_dict(state)
    report.coverage = Coverage.of(report.sites, eager, dynamo, error)
    if be.progress:
        be.progress(report.coverage.summary())
    report.coverage.warn_if_low()
    return report
