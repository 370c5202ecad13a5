"""``fqt.explain``: compile a model with the fqt backend and report what happened to every GEMM."""

from __future__ import annotations

import copy
import sys
import time
import types
from typing import Any, Callable

import torch

from .backend import FQTBackend
from .config import FQTConfig
from .coverage import Coverage, DynamoSnapshot
from .distributed import sharded_modules
from .errors import FQTError
from .forward_error import forward_errors
from .report import ExplainReport
from .flops import step_flops

__all__ = ["explain"]


def _compile_once(be: FQTBackend, model: Any, example_inputs: tuple, kwargs: dict | None, devices: list) -> DynamoSnapshot:
    """Compile ``model`` for one forward pass with ``be`` (the backward compiled at once, so the
    report has its GEMMs' codegen decisions too); what Dynamo did meanwhile."""
    # A fresh code object per call gives Dynamo a fresh cache: explaining many models (or one
    # model under many recipes) never runs into the recompile limit or reuses another backend.
    fresh = types.FunctionType(_call.__code__.replace(), _call.__globals__, "fqt_explain_call")
    before = DynamoSnapshot.take()
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch._functorch.config.patch(
        force_non_lazy_backward_lowering=True
    ):
        # static shapes: the report shows the shapes of these inputs, not Dynamo's symbols
        torch.compile(fresh, backend=be, dynamic=False)(model, *example_inputs, **(kwargs or {}))
    return DynamoSnapshot.take().since(before)


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
    state = copy.deepcopy(model.state_dict()) if isinstance(model, torch.nn.Module) else None
    devices = [t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"]
    dynamo = _compile_once(be, model, example_inputs, kwargs, devices)
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
