"""The ``fqt`` torch.compile backend: the AOTAutograd wiring.

Dynamo hands the backend an FX graph; AOTAutograd traces its joint forward-backward graph and
calls our ``partition_fn``, where the pipeline's rewrite steps run on the joint graph before the
min-cut partitioner splits it (so the partitioner can choose to save low-bit codes for the
backward). Graphs traced without autograd (``torch.no_grad``, eval) go through the inference
compiler and get the forward quantization only. The partitioned graphs then take the
pipeline's compile steps. Every step is listed, in order, in ``fqt_compiler.pipeline``.

``torch.compile(m, backend="fqt")`` finds :func:`fqt_backend` through the
``torch_dynamo_backends`` entry point; ``options={...}`` arrive as the ``options`` keyword.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from . import pipeline
from ._logging import dump_dir
from fqt_compiler.codegen.inline import inductor_decompositions
from .config import FQTConfig, Inference, Mode
from .dump import graph_text, runnable_source
from .errors import OptionsError
from .monitor_runtime import GraphWatch, MonitoredGraph
from fqt_compiler.passes import PassContext
from fqt_compiler.passes.matchers import GEMM_PACKETS
from .pipeline import GraphContext, SavedStrides, Stage
from .records import GraphRecord
from .report import ExplainReport

__all__ = ["FQTBackend", "GraphRecord", "backend", "fqt_backend", "last_compiles"]

log = logging.getLogger("fqt_compiler")

# The most recent graph records of every backend instance, for inspection after a
# torch.compile(backend="fqt") call that gave the user no handle on the backend object.
_RECENT: collections.deque[GraphRecord] = collections.deque(maxlen=64)


def last_compiles() -> list[GraphRecord]:
    """Records of the most recently compiled graphs (newest last), across backend instances."""
    return list(_RECENT)


@dataclass
class _Compile:
    """One Dynamo graph's compile: its record, and what its forward hands its backward."""

    record: GraphRecord
    param_indices: frozenset[int]
    config: FQTConfig
    saved: SavedStrides = field(default_factory=SavedStrides)
    watch: GraphWatch | None = None  # the monitored variant's probes (monitor_runtime)


def _hide_probe_strides(outputs: int) -> None:
    """Inductor reports the strides of every output it compiled; AOTAutograd reads the saved
    tensors' strides from the end of that list, where a monitored graph has its probes (which
    its wrapper strips): report the graph's own outputs only."""
    context = torch._guards.TracingContext.try_get()
    if context is not None and context.output_strides:
        del context.output_strides[outputs:]


class FQTBackend:
    """A configured ``fqt`` backend: pass an instance as ``torch.compile(..., backend=...)``.

    ``records`` lists one :class:`GraphRecord` per graph compiled through this instance.
    """

    def __init__(self, config: FQTConfig) -> None:
        self.dump_dir = dump_dir()
        if self.dump_dir and not config.debug:
            config = replace(config, debug=True)  # dumps need every stage captured
        self.config = config
        self.records: list[GraphRecord] = []
        self.progress: Callable[[str], None] | None = None  # called with one line per compile step (explain, inspect)

    def __repr__(self) -> str:
        return f"FQTBackend(recipe={self.config.recipe.name!r}, execution={self.config.execution.value!r})"

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    def _rewrite(self, gm: fx.GraphModule, job: _Compile, stage: Stage) -> None:
        """The pipeline's rewrite steps on the joint (or inference) graph."""
        record = job.record
        ctx = PassContext(job.config, record.graph_id, job.param_indices)
        pipeline.rewrite_graph(gm, ctx, stage)
        record.decisions = ctx.decisions
        if job.config.execution is Mode.KERNELS:
            record.mark_pending()
        record.passes = list(ctx.ran)
        record.graph_texts = ctx.graph_texts
        record.stages = list(ctx.stages)
        record.dot = ctx.dot
        record.counters = ctx.counters
        log.info("fqt: graph %d (%s): %d GEMM sites", record.graph_id, record.kind, len(ctx.decisions))
        self._say(f"graph {record.graph_id} ({record.kind}): {len(ctx.decisions)} GEMM sites rewritten, compiling")

    def _compile(self, gm: fx.GraphModule, inputs: list[Any], job: _Compile, stage: Stage):
        """The pipeline's compile steps on a partitioned graph; returns the boxed callable."""
        record = job.record
        ctx = GraphContext(job.config, stage, record.graph_id, example_inputs=list(inputs), saved=job.saved, watch=job.watch)
        before = SavedStrides.output_strides(gm)
        t0 = time.perf_counter()
        out = pipeline.compile_partitioned(gm, ctx)
        self._say(f"graph {record.graph_id}: {stage.value} compiled in {time.perf_counter() - t0:.1f} s")
        if stage is Stage.FORWARD:
            job.saved = SavedStrides.changed(gm, before)
        record.apply_lowering(out.lowered, backward=stage is Stage.BACKWARD)
        record.kernel_sources.update(out.sources)
        record.fused.extend(out.fused)
        record.layouts.extend(out.layouts)
        if out.launches is not None:
            record.launches.append(out.launches)
        if job.config.debug:  # the partitioned (and, in kernels mode, lowered) graph
            title = f"fqt graph {record.graph_id}, partitioned {stage.value} ({job.config.execution.value} mode)"
            record.stages.append((stage.value, graph_text(gm), runnable_source(gm, title, f"{stage.value}.py")))
        if self.dump_dir:
            report = ExplainReport(self.config.recipe.name, list(self.records))
            for line in report.write(self.dump_dir):
                log.debug("fqt dump: %s", line)
        if job.watch is not None:
            job.watch.set_decisions(record.decisions)
            if stage is Stage.FORWARD:  # the only compile AOTAutograd collects output strides for
                _hide_probe_strides(len(before))
            return job.watch.wrap(out.fn, stage.value, ctx.probes)
        return out.fn

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, mode: str | None = None):
        """Compile one Dynamo graph. ``torch.compile`` passes its ``mode`` (Inductor's, for the
        high-precision rest of the graph) and ``options`` to a backend object."""
        config = self._with_compile_args(options, mode)
        monitor = config.monitor
        graph_id = len(self.records)
        if monitor is None or not torch.is_grad_enabled():  # inference graphs are not monitored
            return self._aot(gm, example_inputs, config, graph_id)
        # one monitor may watch graphs of several backends (backend="fqt" makes one per graph):
        # it numbers them, so that every site has one name
        graph_id = monitor.claim_graph_id(graph_id)

        def build(watch: GraphWatch | None):
            watched = replace(config, rules=(*monitor.rules, *config.rules))  # the policy's fixes first
            return self._aot(gm, example_inputs, watched, graph_id, watch)

        return MonitoredGraph(monitor, graph_id, build)

    def _with_compile_args(self, options: dict | None, mode: str | None) -> FQTConfig:
        if options:
            raise OptionsError(f"torch.compile(options={options!r}) with a configured fqt.backend(...): give these options "
                               "to fqt.backend(...) instead (or use backend='fqt' with options=)")
        mode = None if mode is None else str(mode).lower()
        if mode is None or mode == self.config.inductor_mode:
            return self.config
        if self.config.inductor_mode != "default":
            raise OptionsError(f"torch.compile's mode={mode!r} and fqt.backend(inductor_mode="
                               f"{self.config.inductor_mode!r}) both given; give one")
        return replace(self.config, inductor_mode=mode)  # validated like the option

    def _aot(self, gm: fx.GraphModule, example_inputs: list[Any], config: FQTConfig, graph_id: int,
             watch: GraphWatch | None = None):
        """AOTAutograd with the pipeline on ``gm``. The plain compile's record is this graph's
        (a recompile replaces it); a monitored variant's record is its own."""
        params = frozenset(i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter))
        job = _Compile(GraphRecord(graph_id=graph_id), params, config, watch=watch)
        replaced = None
        if watch is None:
            same = [i for i, r in enumerate(self.records) if r.graph_id == graph_id]
            if same:  # a recompile (the monitor's policy changed the rules): the new record replaces the old
                replaced = self.records[same[0]]
                self.records[same[0]] = job.record
            else:
                self.records.append(job.record)
            _RECENT.append(job.record)
        try:
            return self._aot_autograd(gm, example_inputs, config, job)
        except torch._dynamo.exc.RestartAnalysis:
            # Dynamo abandons this graph and traces the frame again (e.g. to turn a float it
            # specialized into a tensor): no record of a graph that never compiled
            if watch is None:
                _forget(self.records, job.record, replaced)
                _forget(_RECENT, job.record)
            raise

    def _aot_autograd(self, gm: fx.GraphModule, example_inputs: list[Any], config: FQTConfig, job: _Compile):
        """AOTAutograd with fqt's rewrite in its partitioner and fqt's compilers."""

        def partition_fn(joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
            job.record.kind = "joint"
            self._rewrite(joint, job, Stage.JOINT)
            return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

        def inference_compiler(graph: fx.GraphModule, inputs: list[Any]):
            job.record.kind = "inference"
            if config.inference is Inference.HIGH_PRECISION:  # evaluation in high precision: no rewrite at all
                job.record.kind = "inference (high precision)"
                self._say(f"graph {job.record.graph_id} (inference): left in high precision (inference='high_precision')")
            else:
                self._rewrite(graph, job, Stage.INFERENCE)
            return self._compile(graph, inputs, job, Stage.FORWARD)

        kwargs: dict[str, Any] = {}
        if config.execution is Mode.KERNELS and config.inductor:
            # what Inductor's lowerings expect, less its GEMM rewrites (see GEMM_PACKETS)
            kwargs["decompositions"] = {op: fn for op, fn in inductor_decompositions().items()
                                        if getattr(op, "overloadpacket", None) not in GEMM_PACKETS}
        # keep_inference_input_mutations, as torch's own backends (aot_eager, Inductor) pass it:
        # without it a buffer mutated in the forward (BatchNorm's running statistics) and
        # recomputed in the backward (activation checkpointing) is saved, then bumped by the
        # copy back into the buffer, and the backward refuses the changed tensor
        return aot_autograd(
            keep_inference_input_mutations=True,
            fw_compiler=lambda graph, inputs: self._compile(graph, inputs, job, Stage.FORWARD),
            bw_compiler=lambda graph, inputs: self._compile(graph, inputs, job, Stage.BACKWARD),
            inference_compiler=inference_compiler,
            partition_fn=partition_fn,
            **kwargs,
        )(gm, example_inputs)


def _forget(records, record: GraphRecord, replaced: GraphRecord | None = None) -> None:
    """Take ``record`` out of ``records`` (putting back the record it replaced, if any)."""
    for i, r in enumerate(records):
        if r is record:
            if replaced is None:
                del records[i]
            else:
                records[i] = replaced
            return


def backend(recipe: Any = None, **options: Any) -> FQTBackend:
    """A configured backend: ``torch.compile(model, backend=fqt.backend(recipe="bhq5"))``.

    Options: ``recipe`` (name or Recipe; default ``"int8"``), ``execution`` (``"kernels"``,
    the default, or ``"reference"``), ``inductor`` (kernels mode: compile the rest of each graph
    with Inductor, default True), ``inductor_mode`` (torch.compile's ``mode`` for that),
    ``strict`` (raise instead of skipping a GEMM the recipe wants quantized), ``debug`` (verify
    after every pass, keep every pass's graph text); see :class:`FQTConfig` for the rest.
    """
    if recipe is not None:
        options["recipe"] = recipe
    return FQTBackend(FQTConfig.from_options(options))


def fqt_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None, mode: str | None = None):
    """The function registered as ``backend="fqt"``. ``torch.compile`` passes ``options`` and
    its ``mode`` (which becomes ``inductor_mode``; torch never passes both)."""
    options = dict(options or {})
    if mode is not None:
        if "inductor_mode" in options or "mode" in options:
            raise OptionsError("torch.compile's mode= and options={'inductor_mode' / 'mode': ...} both given; give one")
        options["inductor_mode"] = mode
    return FQTBackend(FQTConfig.from_options(options))(gm, example_inputs)
