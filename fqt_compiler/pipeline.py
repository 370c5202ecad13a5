"""Every transformation fqt makes to a graph, in order: the one table (:data:`STEPS`) and its
runner (:func:`run_steps`).

::

    Dynamo FX graph --AOTAutograd--> joint forward+backward graph     (Stage.JOINT)
      1 find_sites        every GEMM / convolution, paired with its backward GEMMs
      2 select_specs      a spec per operand from the recipe and the rules; a decision per site
      3 insert_qdq        quantize / dequantize nodes around every quantized GEMM operand
      4 dedupe            one quantization per (tensor, spec): shared by the GEMMs that read it
      5 mark_saved_codes  codes the backward reads K-major only column-major      [kernels, fusion]
    --min-cut partitioner--> forward graph (Stage.FORWARD), backward graph (Stage.BACKWARD)
      6 restride_inputs   the backward's inputs take the strides the forward saved them in [backward]
      6b instrument_monitor probes of a monitored variant, as extra outputs   [monitor; its variant only]
      7 lower_gemms       quantize -> dequantize -> GEMM chains become low-bit GEMMs  [kernels]
      8 fuse_prologues    pointwise chains feeding a quantizer join its kernel        [kernels, fusion]
      9 fuse_epilogues    bias / residual / activation after a low-bit GEMM join it   [kernels, fusion]
     10 fold_statistics   the next quantizer's statistics gathered in that epilogue   [kernels, fusion]
     11 choose_code_layouts codes written in the memory order their GEMMs read K-major [kernels, fusion]
     12 swap_to_kernel_ops quantizers on CUDA run as Triton kernels                   [kernels]
     13 choose_gemm_providers  CUDA GEMMs on the measured-fastest of Triton / cuBLASLt [kernels, inductor]
     14 collect_sources   the source of every kernel the graph calls (reports)        [kernels]
     15 inline_kernel_launches  CUDA kernel ops traced into kernels Inductor launches [kernels, inductor]
     16 inline_quantize_ops the reference quantizers as aten ops, for Inductor to fuse [kernels, inductor]
     17 inline_qmm_ops    CPU int8 GEMMs and convolutions: library call + epilogue   [kernels, inductor]
     18 replace_random    Inductor's random-op rewrite (its own pre-partition step)   [kernels, inductor]
     19 rematerialize_dequantizations  each fusing reader recomputes 8-bit codes * scale  [kernels, inductor]
     20 decompose_unlowered_gemms  skipped matrix-vector products, decomposed         [kernels, inductor]
     21 record_input_strides  the conv kernels' inputs keep their traced strides     [kernels, inductor]
    --> Inductor (``inductor=True``) or eager execution: ``codegen.compile_graph``

Graphs traced without autograd (``Stage.INFERENCE``) take steps 1-4, then 7-21 as a forward.
Each step names the stages it runs on, the configurations it runs under (``when``) and the
steps it ``requires``. The runner checks those, keeps the graph after every rewrite step in
debug mode, verifies the graph invariants (after every mutating rewrite in debug mode, and at
the end of the rewrite in every mode), and re-raises a failure with the step, the stage and the
steps that already ran.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import fx

from fqt_compiler.codegen import CompiledGraph, compile_graph
from fqt_compiler.codegen.code_layout import choose_code_layouts, mark_saved_codes, restride_inputs
from fqt_compiler.codegen.epilogue import fold_statistics, fuse_epilogues
from fqt_compiler.codegen.prologue import fuse_prologues
from fqt_compiler.codegen.inline import inline_qmm_ops, inline_quantize_ops, record_input_strides, rematerialize_dequantizations
from fqt_compiler.codegen.inline import decompose_unlowered_gemms, replace_random
from fqt_compiler.codegen.launches import graph_launches, inline_kernel_launches, source_launches
from fqt_compiler.codegen.providers import choose_providers
from fqt_compiler.codegen.lower import lower_gemms
from fqt_compiler.ops import triton_here
from fqt_compiler.codegen.kernel_select import swap_to_kernel_ops
from fqt_compiler.codegen.sources import kernel_sources
from fqt_compiler.passes import Dedupe, FindSites, InsertQDQ, PassContext, SelectSpecs
from fqt_compiler.passes.base import FQTPass
from fqt_compiler.passes.monitor_graph import instrument_graph
from fqt_compiler.passes.graph_utils import static_tensor
from fqt_compiler.passes.verify import verify_graph

from .config import FQTConfig, Fusion, Mode
from .dump import graph_dot, graph_text, runnable_source
from .errors import FQTError, OptionsError, PassError

__all__ = [
    "Stage", "Step", "STEPS", "GraphContext", "SavedStrides", "run_steps", "rewrite_graph", "compile_partitioned",
    "steps_for",
]

# the logger every step reports on (its historical name: the rewrite passes came first)
log = logging.getLogger("fqt_compiler.passes")


class Stage(enum.Enum):
    """Which graph a step sees: the joint graph (training) or the inference graph before
    partitioning; the forward or the backward graph after it."""

    JOINT = "joint"
    INFERENCE = "inference"
    FORWARD = "forward"
    BACKWARD = "backward"


REWRITE = frozenset({Stage.JOINT, Stage.INFERENCE})
COMPILE = frozenset({Stage.FORWARD, Stage.BACKWARD})


@dataclass(frozen=True)
class SavedStrides:
    """Forward outputs the compiled forward stores in another memory order than traced (codes
    written column-major): output name -> strides. The backward graph's inputs take them."""

    by_name: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @staticmethod
    def output_strides(gm: fx.GraphModule) -> list[tuple[str, tuple[int, ...]] | None]:
        """(name, strides) of every static tensor output of ``gm`` (None for the others:
        symbolic tensors are never re-strided)."""
        return [(o.name, tuple(o.meta["val"].stride())) if static_tensor(o) is not None else None for o in _outputs(gm)]

    @classmethod
    def changed(cls, gm: fx.GraphModule, before: list) -> SavedStrides:
        """The outputs whose strides the compile steps changed (``before``: :meth:`output_strides`
        taken before them). Only changes the compiled forward really makes count: where Inductor
        compiled the forward it reports the strides of its code's outputs, and AOTAutograd already
        gives those to the backward's example inputs; a fake value that disagrees with Inductor's
        report is not what runs, and restriding from it broke the backward's stride checks."""
        context = torch._guards.TracingContext.try_get()
        reported = list(context.output_strides or []) if context is not None and context.output_strides is not None else []
        out = {}
        for i, (b, o) in enumerate(zip(before, _outputs(gm))):
            if b is None or not static_tensor(o) is not None:
                continue
            new = tuple(o.meta["val"].stride())
            real = reported[i] if i < len(reported) else None
            if new != b[1] and (real is None or tuple(real) == new):
                out[b[0]] = new
        return cls(out)


def _outputs(gm: fx.GraphModule) -> list:
    return list(next(n for n in gm.graph.nodes if n.op == "output").args[0])


@dataclass
class GraphContext:
    """One graph's trip through the pipeline: what the steps read and what they produce."""

    config: FQTConfig
    stage: Stage
    graph_id: int = 0
    rewrite: PassContext | None = None  # the rewrite passes' state (sites, decisions, graph texts)
    example_inputs: list = field(default_factory=list)  # our copy: restriding never touches AOTAutograd's
    saved: SavedStrides = field(default_factory=SavedStrides)
    lowered: list = field(default_factory=list)  # codegen.LoweredGemm per GEMM the lowering saw
    fused: list = field(default_factory=list)  # codegen.FusedQuantize / FusedEpilogue
    layouts: list = field(default_factory=list)  # codegen.LayoutChoice
    sources: dict[str, str] = field(default_factory=dict)
    python_calls: list = field(default_factory=list)  # (node, reason): kernel ops left as Python calls
    watch: Any = None  # monitor_runtime.GraphWatch: this is a monitored variant, to instrument
    probes: list = field(default_factory=list)  # passes.monitor_graph.Probe: the extra outputs it got
    ran: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rewrite is None:
            self.rewrite = PassContext(self.config, self.graph_id)
        self.ran = self.rewrite.ran  # one list: the rewrite passes read what ran before them

    @property
    def name(self) -> str:
        return f"graph{self.graph_id}_{self.stage.value}"


@dataclass(frozen=True)
class Step:
    """One transformation: ``run(gm, ctx)`` on the stages it names, when ``when(config)``."""

    name: str
    run: Callable[[fx.GraphModule, GraphContext], Any]
    stages: frozenset[Stage]
    when: Callable[[FQTConfig], bool] = lambda config: True
    requires: tuple[str, ...] = ()
    mutates: bool = True
    capture: bool = False  # keep the graph after it (debug mode): the rewrite's per-pass stages


def _rewrite_pass(cls: type[FQTPass], stages: frozenset[Stage] = REWRITE) -> Step:
    """A pass over the joint (or inference) graph as a step."""
    return Step(cls.name, lambda gm, ctx: cls().run(gm, ctx.rewrite), stages, requires=cls.requires,
                mutates=cls.mutates, capture=True)


def _kernels(config: FQTConfig) -> bool:
    return config.execution is Mode.KERNELS


def _fusing(config: FQTConfig) -> bool:
    return config.execution is Mode.KERNELS and config.fusion is not Fusion.OFF


def _inductor(config: FQTConfig) -> bool:
    return config.execution is Mode.KERNELS and config.inductor


def _tagged(items: list, ctx: GraphContext) -> list:
    """Tag fused kernels / layout choices with their graph's stage: node names repeat across
    the forward and the backward graph."""
    return [replace(item, stage=ctx.stage.value) for item in items]


def _fuse_prologues(gm: fx.GraphModule, ctx: GraphContext) -> None:
    triton = _include_cpu(ctx)
    if triton and any(isinstance(n.meta.get("val"), torch.Tensor) and not triton_here(n.meta["val"]) for n in gm.graph.nodes):
        raise OptionsError(
            "fusion='triton' runs generated Triton kernels, which need CUDA tensors (or TRITON_INTERPRET=1 "
            "on CPU, for tests); on CPU use fusion='auto', where Inductor fuses the quantizers"
        )
    ctx.fused.extend(_tagged(fuse_prologues(gm, include_cpu=triton), ctx))


def _include_cpu(ctx: GraphContext) -> bool:
    # fusion='triton' fuses on every device (CPU only under the interpreter); 'auto' on CUDA only
    return ctx.config.fusion is Fusion.TRITON


def _restride(gm: fx.GraphModule, ctx: GraphContext) -> None:
    if ctx.saved.by_name:
        ctx.example_inputs = restride_inputs(gm, ctx.saved.by_name, ctx.example_inputs)


def _instrument(gm: fx.GraphModule, ctx: GraphContext) -> None:
    if ctx.watch is not None:
        ctx.probes = instrument_graph(gm, ctx.stage.value, ctx.watch.monitor.total_variance)


def _lower(gm: fx.GraphModule, ctx: GraphContext) -> None:
    ctx.lowered = lower_gemms(gm, inductor=ctx.config.inductor)


def _epilogues(gm: fx.GraphModule, ctx: GraphContext) -> None:
    ctx.fused.extend(_tagged(fuse_epilogues(gm, include_cpu=_include_cpu(ctx)), ctx))


def _statistics(gm: fx.GraphModule, ctx: GraphContext) -> None:
    ctx.fused.extend(_tagged(fold_statistics(gm, include_cpu=_include_cpu(ctx)), ctx))


def _code_layouts(gm: fx.GraphModule, ctx: GraphContext) -> None:
    ctx.layouts.extend(_tagged(choose_code_layouts(gm, include_cpu=_include_cpu(ctx)), ctx))


def _swap(gm: fx.GraphModule, ctx: GraphContext) -> None:
    # fusion='off': every quantization stays a standalone kernel op (CPU: a compiled standalone quantizer)
    swap_to_kernel_ops(gm, include_cpu=ctx.config.fusion is Fusion.OFF)


def _providers(gm: fx.GraphModule, ctx: GraphContext) -> None:
    chosen = {(c.site_id, c.gemm): c for c in choose_providers(gm)}
    for i, lowered in enumerate(ctx.lowered):
        choice = chosen.get((lowered.site_id, lowered.gemm))
        if choice is not None:  # the dtype pair and the BHQ inverse stay named after the provider
            ctx.lowered[i] = replace(lowered, kernel=choice.describe(lowered.kernel.removeprefix("triton qmm")))


def _sources(gm: fx.GraphModule, ctx: GraphContext) -> None:
    ctx.sources.update(kernel_sources(gm, ctx.stage.value))


def _launches(gm: fx.GraphModule, ctx: GraphContext) -> None:
    ctx.python_calls.extend(inline_kernel_launches(gm))


_TRAINING_GRAPH = frozenset({Stage.JOINT})
_BACKWARD = frozenset({Stage.BACKWARD})

#: Every transformation, in the order it runs (see the module docstring for the picture).
STEPS: tuple[Step, ...] = (
    _rewrite_pass(FindSites),
    _rewrite_pass(SelectSpecs),
    _rewrite_pass(InsertQDQ),
    _rewrite_pass(Dedupe),
    # metadata only (the graph text does not change): not captured
    Step("mark_saved_codes", lambda gm, ctx: mark_saved_codes(gm), _TRAINING_GRAPH, _fusing, ("insert_qdq",),
         mutates=False),
    Step("restride_inputs", _restride, _BACKWARD),
    # before any lowering: the probes read the graph's quantizers and GEMMs as the passes left them
    Step("instrument_monitor", _instrument, COMPILE, lambda config: config.monitor is not None),
    Step("lower_gemms", _lower, COMPILE, _kernels),
    # prologues first, so quantizers take the chains feeding them; then GEMM epilogues (their
    # consumers, the next quantizer's statistics); the codes' memory order last, once every
    # GEMM reading them is in place
    Step("fuse_prologues", _fuse_prologues, COMPILE, _fusing, ("lower_gemms",)),
    Step("fuse_epilogues", _epilogues, COMPILE, _fusing, ("fuse_prologues",)),
    Step("fold_statistics", _statistics, COMPILE, _fusing, ("fuse_epilogues",)),
    Step("choose_code_layouts", _code_layouts, COMPILE, _fusing, ("fold_statistics",)),
    Step("swap_to_kernel_ops", _swap, COMPILE, _kernels, ("lower_gemms",)),
    Step("choose_gemm_providers", _providers, COMPILE, _inductor, ("swap_to_kernel_ops",)),
    # before inlining: the reports show each fqt op's kernel while it is still a node of its own
    Step("collect_sources", _sources, COMPILE, _kernels, ("swap_to_kernel_ops",), mutates=False),
    # before replace_random: the launchers' seed draws become Inductor's random ops too
    Step("inline_kernel_launches", _launches, COMPILE, _inductor, ("collect_sources",)),
    Step("inline_quantize_ops", lambda gm, ctx: inline_quantize_ops(gm), COMPILE, _inductor, ("collect_sources",)),
    Step("inline_qmm_ops", lambda gm, ctx: inline_qmm_ops(gm), COMPILE, _inductor, ("collect_sources",)),
    Step("replace_random", lambda gm, ctx: replace_random(gm), COMPILE, _inductor, ("inline_quantize_ops",)),
    Step("rematerialize_dequantizations", lambda gm, ctx: rematerialize_dequantizations(gm), COMPILE, _inductor,
         ("inline_quantize_ops",)),
    Step("decompose_unlowered_gemms", lambda gm, ctx: decompose_unlowered_gemms(gm), COMPILE, _inductor,
         ("inline_qmm_ops",)),
    # last: the recorded input values must be those of the nodes' final arguments
    Step("record_input_strides", lambda gm, ctx: record_input_strides(gm), COMPILE, _inductor, mutates=False),
)


def steps_for(stage: Stage, config: FQTConfig) -> list[Step]:
    """The steps that run on a ``stage`` graph under ``config``, in order."""
    # an inference graph is rewritten like a joint one, then compiled like a forward one
    return [s for s in STEPS if stage in s.stages and s.when(config)]


def _capture(gm: fx.GraphModule, ctx: GraphContext, after: str) -> None:
    """Keep the graph after ``after`` as text and as a runnable script (debug mode)."""
    text = graph_text(gm)
    ctx.rewrite.graph_texts.append((after, text))
    title = f"fqt graph {ctx.graph_id}, after {after}"
    ctx.rewrite.stages.append((after, text, runnable_source(gm, title, f"{after}.py")))


def _run_step(step: Step, gm: fx.GraphModule, ctx: GraphContext) -> None:
    missing = [r for r in step.requires if r not in ctx.ran]
    if missing:
        raise PassError(f"fqt step {step.name!r} requires {missing} to run first (ran: {ctx.ran})")
    try:
        step.run(gm, ctx)
        if ctx.config.debug and step.mutates and ctx.stage in REWRITE:
            verify_graph(gm, step.name)
    except FQTError:
        raise
    except Exception as exc:
        raise PassError(
            f"fqt step {step.name!r} failed on the {ctx.stage.value} graph {ctx.graph_id} after steps {ctx.ran}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    ctx.ran.append(step.name)
    log.debug("pass %s done on graph %d (%d nodes)", step.name, ctx.graph_id, len(gm.graph.nodes))
    if ctx.config.debug and step.capture:
        _capture(gm, ctx, step.name)


def run_steps(gm: fx.GraphModule, ctx: GraphContext) -> fx.GraphModule:
    """Run every step of :data:`STEPS` for ``ctx.stage`` and ``ctx.config`` on ``gm``, in place."""
    rewriting = ctx.stage in REWRITE
    if rewriting and ctx.config.debug:
        _capture(gm, ctx, "input")
    for step in steps_for(ctx.stage, ctx.config):
        _run_step(step, gm, ctx)
    if rewriting:
        verify_graph(gm, "pipeline")
        if ctx.config.debug:
            title = f"fqt graph {ctx.graph_id} ({ctx.config.recipe.name}), after the passes"
            ctx.rewrite.dot = graph_dot(gm, title)
    return gm


def rewrite_graph(gm: fx.GraphModule, passes: PassContext, stage: Stage = Stage.JOINT) -> fx.GraphModule:
    """The rewrite half (steps on the joint or inference graph) with the passes' state ``passes``."""
    if stage not in REWRITE:
        raise ValueError(f"rewrite_graph runs on a joint or inference graph, not {stage}")
    return run_steps(gm, GraphContext(passes.config, stage, passes.graph_id, rewrite=passes))


def compile_partitioned(gm: fx.GraphModule, ctx: GraphContext) -> CompiledGraph:
    """The compile half on a forward or backward graph, then Inductor or eager execution."""
    if ctx.stage not in COMPILE:
        raise ValueError(f"compile_partitioned runs on a forward or backward graph, not {ctx.stage}")
    run_steps(gm, ctx)
    # counted before Inductor compiles: it rewrites the graph in place
    launches = graph_launches(ctx.stage.value, gm, ctx.python_calls, _inductor(ctx.config))
    out = compile_graph(gm, ctx.example_inputs, ctx.config, ctx.name)
    code = out.sources.get(f"inductor:{ctx.name}")
    return replace(out, lowered=ctx.lowered, sources={**ctx.sources, **out.sources}, fused=ctx.fused,
                   layouts=ctx.layouts, launches=source_launches(launches, code) if code else launches)
