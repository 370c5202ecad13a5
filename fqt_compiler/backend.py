"""The ``fqt`` torch.compile backend.

Dynamo hands the backend an FX graph; AOTAutograd traces its joint forward-backward graph and
calls our ``partition_fn``, where ``passes.run_passes`` rewrites the joint graph before the
min-cut partitioner splits it (so the partitioner can choose to save low-bit codes for the
backward). Graphs traced without autograd (``torch.no_grad``, eval) go through the inference
compiler and get the forward quantization only. The partitioned graphs are then handed to
``codegen.compile_graph``.

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

from ._logging import dump_dir
from .config import FQTConfig
from .dump import graph_text, runnable_source
from .config import Fusion, Inference, Mode
from .errors import OptionsError
from .sites import GemmStatus, SiteDecision

__all__ = ["FQTBackend", "GraphRecord", "backend", "fqt_backend", "last_compiles"]

log = logging.getLogger("fqt_compiler")

# The most recent graph records of every backend instance, for inspection after a
# torch.compile(backend="fqt") call that gave the user no handle on the backend object.
_RECENT: collections.deque[GraphRecord] = collections.deque(maxlen=64)


@dataclass
class GraphRecord:
    """What the backend did to one graph Dynamo handed it."""

    graph_id: int
    kind: str = ""  # "joint" or "inference"
    decisions: list[SiteDecision] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    graph_texts: list[tuple[str, str]] = field(default_factory=list)
    stages: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, text, runnable .py)
    dot: str = ""  # Graphviz picture of the rewritten joint graph
    counters: dict[str, int] = field(default_factory=dict)
    kernel_sources: dict[str, str] = field(default_factory=dict)  # generated code per kernel / graph
    fused: list = field(default_factory=list)  # codegen.FusedQuantize / FusedEpilogue: generated fused kernels
    layouts: list = field(default_factory=list)  # codegen.LayoutChoice: codes in the order their GEMMs read K-major

    def apply_lowering(self, lowered: list) -> None:
        """Fold codegen's per-GEMM results (``codegen.LoweredGemm``) into the decisions."""
        by_key = {(r.site_id, r.gemm): r for r in lowered}
        updated = []
        for site in self.decisions:
            gemms = []
            for g in site.gemms:
                r = by_key.get((site.site_id, g.kind))
                if r is not None and g.status is not GemmStatus.SKIPPED:
                    g = replace(g, status=r.status, reason=r.reason, kernel=r.kernel)
                gemms.append(g)
            updated.append(replace(site, gemms=tuple(gemms)))
        self.decisions = updated


def last_compiles() -> list[GraphRecord]:
    """Records of the most recently compiled graphs (newest last), across backend instances."""
    return list(_RECENT)


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

    def _run_passes(self, gm: fx.GraphModule, record: GraphRecord, param_indices: frozenset[int]) -> None:
        from passes import PassContext, run_passes

        ctx = PassContext(self.config, record.graph_id, param_indices)
        run_passes(gm, ctx)
        record.decisions = ctx.decisions
        record.passes = list(ctx.ran)
        record.graph_texts = ctx.graph_texts
        record.stages = list(ctx.stages)
        record.dot = ctx.dot
        record.counters = ctx.counters
        log.info("fqt: graph %d (%s): %d GEMM sites", record.graph_id, record.kind, len(ctx.decisions))
        self._say(f"graph {record.graph_id} ({record.kind}): {len(ctx.decisions)} GEMM sites rewritten, compiling")

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    def _dump(self) -> None:
        from .explain import ExplainReport

        report = ExplainReport(self.config.recipe.name, list(self.records))
        for line in report.write(self.dump_dir):
            log.debug("fqt dump: %s", line)

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]):
        from codegen import compile_graph

        config = self.config
        param_indices = frozenset(i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter))
        record = GraphRecord(graph_id=len(self.records))
        self.records.append(record)
        _RECENT.append(record)

        def partition_fn(joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
            record.kind = "joint"
            self._run_passes(joint, record, param_indices)
            if config.execution is Mode.KERNELS and config.fusion is not Fusion.OFF:
                from codegen.code_layout import mark_saved_codes

                mark_saved_codes(joint)  # codes the backward reads K-major only column-major
            return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

        compiled_names: list[str] = []
        saved_strides: dict[str, tuple[int, ...]] = {}  # forward outputs saved in another memory order

        def compiler(graph: fx.GraphModule, inputs: list[Any]):
            from codegen.code_layout import restride_inputs

            name = f"graph{record.graph_id}_" + ("forward", "backward", "graph")[min(len(compiled_names), 2)]
            compiled_names.append(name)
            if name.endswith("backward") and saved_strides:
                restride_inputs(graph, saved_strides, inputs)  # before lowering reads the strides
            outputs = next(n for n in graph.graph.nodes if n.op == "output").args[0]
            before = [(o.name, tuple(o.meta["val"].stride())) if _is_tensor_node(o) else None for o in outputs]
            t0 = time.perf_counter()
            out = compile_graph(graph, inputs, config, name)
            self._say(f"graph {record.graph_id}: {name.split('_', 1)[1]} compiled in {time.perf_counter() - t0:.1f} s")
            if name.endswith("forward"):
                saved_strides.update(_changed_output_strides(graph, before))
            record.apply_lowering(out.lowered)
            record.kernel_sources.update(out.sources)
            record.fused.extend(out.fused)
            record.layouts.extend(out.layouts)
            if config.debug:  # the partitioned (and, in kernels mode, lowered) graph
                stage = name.split("_", 1)[1]
                title = f"fqt graph {record.graph_id}, partitioned {stage} ({config.execution.value} mode)"
                record.stages.append((stage, graph_text(graph), runnable_source(graph, title, f"{stage}.py")))
            if self.dump_dir:
                self._dump()
            return out.fn

        def inference_compiler(graph: fx.GraphModule, inputs: list[Any]):
            record.kind = "inference"
            if config.inference is Inference.HIGH_PRECISION:  # evaluation in high precision: no rewrite at all
                record.kind = "inference (high precision)"
                self._say(f"graph {record.graph_id} (inference): left in high precision (inference='high_precision')")
            else:
                self._run_passes(graph, record, param_indices)
            return compiler(graph, inputs)

        kwargs: dict[str, Any] = {}
        if config.execution is Mode.KERNELS and config.inductor:
            from codegen.inline import inductor_decompositions

            kwargs["decompositions"] = inductor_decompositions()  # what Inductor's lowerings expect
        return aot_autograd(
            fw_compiler=compiler,
            bw_compiler=compiler,
            inference_compiler=inference_compiler,
            partition_fn=partition_fn,
            **kwargs,
        )(gm, example_inputs)


def _changed_output_strides(graph: fx.GraphModule, before: list) -> dict[str, tuple[int, ...]]:
    """Forward outputs that fqt's passes re-laid out (codes written column-major): {name: their
    new strides}, for the backward graph's inputs.

    Only changes the compiled forward really makes count. Where Inductor compiled the forward it
    reports the strides of its code's outputs, and AOTAutograd already gives those to the
    backward's example inputs; a fake value that disagrees with Inductor's report (contiguous
    after fqt's passes, channels-last in Inductor's code, say) is not what runs, and restriding
    the backward's input from it broke the backward's stride checks."""
    context = torch._guards.TracingContext.try_get()
    reported = list(context.output_strides or []) if context is not None and context.output_strides is not None else []
    after = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    changed = {}
    for i, (b, o) in enumerate(zip(before, after)):
        if b is None or not _is_tensor_node(o):
            continue
        new = tuple(o.meta["val"].stride())
        real = reported[i] if i < len(reported) else None
        if new != b[1] and (real is None or tuple(real) == new):
            changed[b[0]] = new
    return changed


def _is_tensor_node(node: Any) -> bool:
    """A node holding a tensor with static strides (symbolic ones are never re-strided)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and all(isinstance(s, int) for s in val.stride())


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
