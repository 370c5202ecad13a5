"""Inline reference implementations into a graph as aten ops, for Inductor to fuse.

On CPU, Inductor turns the reference quantizer's dozen pointwise ops and reductions into a
couple of vectorized C++ loops, and fuses the low-bit GEMM's dequantization epilogue with the
ops around it: an order of magnitude faster than running them eagerly. The numbers are the
reference's (the same function is traced), except that stochastic rounding draws from
Inductor's random stream instead of the eager generator (same distribution).

Symbolic sizes and strides (a dynamic-shape compile, or Dynamo's automatic dynamic shapes
after a second size) are inlined too: the trace reads them from the graph's own symbols. Left
as an opaque call, each quantizer would run eagerly, a dozen passes over its tensor where the
fused loop makes one or two.
"""

from __future__ import annotations

import collections
import contextlib
import operator
from typing import Callable

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fqt_compiler.bhq import bhq_inverse_ref, bhq_quantize_ref
from fqt_compiler.memory_order import in_input_layout
from fqt_compiler.ops import QUANTIZE_OPS, bhq_inverse_op, bhq_quantize_op
from fqt_compiler.ops import monitor_codes_op, monitor_error_op, monitor_fake_op, monitor_gradient_op
from fqt_compiler.monitor_stats import error_stats, fake_quantizer_stats, gradient_stats, quantizer_stats
from fqt_compiler.grid import QOperand
from fqt_compiler.layout import Layout
from fqt_compiler.reference import quantize_ref
from fqt_compiler.specs import QuantSpec
from fqt_compiler.passes.dequant_chain import DequantOperand, is_dequantization, match_operand
from fqt_compiler.passes.graph_utils import call, is_static_value
from fqt_compiler.passes.matchers import GEMM_PACKETS

from fqt_compiler.conv_paths import qconv_cpu_of_op_args
from fqt_compiler.cpu_gemm import qbmm_cpu, qmm_cpu
from fqt_compiler.ops import qbmm_op, qconv_op, qmm_op

__all__ = [
    "inline_quantize_ops", "inline_qmm_ops", "inductor_decompositions", "replace_random", "splice", "all_static", "trace_node",
    "inline_graph_node", "qmm_cpu_of_op_args", "qbmm_cpu_of_op_args", "rematerialize_dequantizations", "record_input_strides",
    "decompose_unlowered_gemms", "TraceCache", "REFERENCE_TRACES",
]


def inductor_decompositions() -> dict:
    """Inductor's decomposition table, safe to use before Inductor has compiled anything: some
    of its decompositions (max pooling's) call into ``torch._inductor.lowering``, which only
    Inductor's own compile path imports -- without this import the first model with a
    ``MaxPool2d`` in a fresh process fails."""
    # Inductor is imported on first use (only Inductor-compiled graphs need it)
    import torch._inductor.lowering  # noqa: F401  (registers what the decompositions call)
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def splice(gm: fx.GraphModule, node: fx.Node, sub: fx.GraphModule, inputs: list[fx.Node]) -> object:
    """Put the nodes of ``sub`` (traced with one placeholder per node of ``inputs``, in order)
    in place of ``node``; ``sub``'s outputs replace ``node``'s (a tuple output replaces the
    ``getitem`` users of ``node``). Returns the replacing nodes (``sub``'s output structure)."""
    fake_mode = next(a.meta["val"].fake_mode for a in inputs)
    env: dict[fx.Node, object] = {}
    placeholders = iter(inputs)
    outputs = None
    with gm.graph.inserting_before(node):
        for s in sub.graph.nodes:
            if s.op == "placeholder":
                env[s] = next(placeholders)
            elif s.op == "output":
                outputs = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, s.args[0])
            else:
                a = tree_map(lambda x: env[x] if isinstance(x, fx.Node) else x, s.args)
                k = tree_map(lambda x: env[x] if isinstance(x, fx.Node) else x, s.kwargs)
                env[s] = call(gm.graph, s.target, a, k, like=node, info=node.meta.get("fqt"), fake_mode=fake_mode,
                              val=_traced_value(s, fake_mode))
    if isinstance(outputs, (tuple, list)):
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise AssertionError(f"{node.name} has a non-getitem user {user.name}")
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
    else:
        node.replace_all_uses_with(outputs)
    gm.graph.erase_node(node)
    return outputs


def _traced_value(s: fx.Node, fake_mode) -> object | None:
    """The fake value of the copy of trace node ``s`` in a graph of ``fake_mode``, taken from
    the trace instead of running the op again (re-running every op of every inlined quantizer
    on fake tensors was half of a small model's compile time). None where it must be run: no
    tensor value, or an output that aliases an input (its storage must be the new input's)."""
    val = s.meta.get("val")
    tensors = [t for t in tree_flatten(val)[0] if isinstance(t, torch.Tensor)]
    if not tensors or s.target is operator.getitem:
        return None
    if all(getattr(t, "fake_mode", None) is fake_mode for t in tensors):
        return val  # traced on the graph's own values (symbolic sizes): already the graph's
    inputs = {StorageWeakRef(t.untyped_storage()) for a in tree_flatten((s.args, s.kwargs))[0] if isinstance(a, fx.Node)
              for t in tree_flatten(a.meta.get("val"))[0] if isinstance(t, torch.Tensor)}
    if any(StorageWeakRef(t.untyped_storage()) in inputs for t in tensors):
        return None
    with fake_mode:  # a functional op's fresh outputs, with the trace's sizes, strides and dtypes
        return tree_map(lambda t: torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device)
                        if isinstance(t, torch.Tensor) else t, val)


def trace_node(fn: Callable, node: fx.Node, functionalize: bool = False) -> tuple[fx.GraphModule, list[fx.Node]]:
    """``fn`` on ``node``'s arguments, traced with fake tensors of the same shapes, strides,
    dtypes and devices (no memory is touched, on any device) and Inductor's decompositions;
    ``functionalize``: under functionalization, which turns ``wrap_triton`` launches into
    ``triton_kernel_wrapper_functional`` nodes. Returns the trace and the graph nodes its
    placeholders stand for, in order."""
    # torch internals: fake tensors and Python functionalization, for this trace only
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize

    flat, spec = tree_flatten((node.args, node.kwargs))
    inputs = _node_inputs(node)
    vals = [a.meta["val"] for a in inputs]

    def traced(*tensors):
        it = iter(tensors)
        args, kwargs = tree_unflatten([next(it) if isinstance(a, fx.Node) else a for a in flat], spec)
        return fn(*args, **kwargs)

    target = dispatch_functionalize(traced, FunctionalTensorMode()) if functionalize else traced
    if all(is_static_value(v) for v in vals):
        # a private tracing context and fake mode: the ambient compile's would make sizes symbolic
        mode, context = FakeTensorMode(), torch._guards.tracing(None)
        with mode:
            examples = [torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=v.device) for v in vals]
    else:
        # Symbolic sizes or strides: trace on the graph's own fake values, in its fake mode, so
        # the trace reads their sizes through ``sym_size`` nodes of the graph's symbols. A branch
        # the function takes on such a size becomes a guard of this compile, installed with
        # Dynamo's own (as Inductor's are).
        mode, context = next(v.fake_mode for v in vals if isinstance(v, torch.Tensor)), contextlib.nullcontext()
        examples = vals
    with context, mode:
        sub = make_fx(target, decomposition_table=inductor_decompositions(), tracing_mode="real")(*examples)
    # Functionalization replays every view of a buffer a kernel writes, and make_fx keeps them
    # all: half of a launch trace's nodes are unused views, and splicing each costs a fake-tensor
    # evaluation (a ResNet-50's launches spliced some 20 000 nodes)
    sub.graph.eliminate_dead_code()
    return sub, inputs


def inline_graph_node(
    gm: fx.GraphModule, node: fx.Node, fn: Callable, functionalize: bool = False, traces: dict | None = None
) -> object:
    """Replace ``node`` by the trace of ``fn`` on its arguments (:func:`trace_node`); returns
    the replacing nodes. ``traces``: a cache of traces by ``fn``, the arguments that are not
    tensors and the tensors' sizes, strides, dtypes and devices (static ones only): a network
    repeats its blocks, and tracing a launcher costs a tenth of a second (a ResNet-50 has some
    500 launches)."""
    key = _trace_key(fn, node, functionalize) if traces is not None else None
    if key is not None and key in traces:
        sub, inputs = traces[key], _node_inputs(node)
    else:
        sub, inputs = trace_node(fn, node, functionalize)
        if key is not None:
            traces[key] = sub
    return splice(gm, node, sub, inputs)


class TraceCache:
    """A bounded least-recently-used cache of traces for :func:`inline_graph_node`. Process-wide
    for the pure reference functions (:data:`REFERENCE_TRACES`): the same quantizer on the same
    sizes recurs across a network's blocks, its forward and backward graphs and every
    recompile, and tracing one is the bulk of the passes' compile time."""

    def __init__(self, size: int = 1024) -> None:
        self.size, self._items = size, collections.OrderedDict()

    def __contains__(self, key) -> bool:
        return key in self._items

    def __getitem__(self, key):
        self._items.move_to_end(key)
        return self._items[key]

    def __setitem__(self, key, sub) -> None:
        self._items[key] = sub
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


REFERENCE_TRACES = TraceCache()


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    """The graph nodes among ``node``'s arguments, in the order a trace's placeholders take them."""
    return [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)]


def _trace_key(fn: Callable, node: fx.Node, functionalize: bool) -> tuple | None:
    """What a trace of ``fn`` on ``node``'s arguments depends on; None where an argument has
    symbolic sizes (its trace reads the graph's own symbols) or is not hashable."""
    flat, spec = tree_flatten((node.args, node.kwargs))
    parts = []
    for a in flat:
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if not isinstance(v, torch.Tensor) or not is_static_value(v):
                return None
            parts.append(("tensor", tuple(v.shape), tuple(v.stride()), v.dtype, v.device))
        else:
            parts.append(a)
    # Inductor's table differs with its random-number configuration
    key = (fn, functionalize, id(inductor_decompositions()), str(spec), tuple(parts))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def decompose_unlowered_gemms(gm: fx.GraphModule) -> int:
    """Decompose, for Inductor, the GEMM-like ops the backend kept out of AOTAutograd's
    decompositions (so that the pass sees and records them) and that Inductor has no lowering
    for: a matrix-vector product (``aten.mv``, ``dot``, ``addmv``...) the pass skipped. Inductor
    expects them decomposed, and asserts on an op in its decomposition table that reaches its
    fallback. Returns how many were decomposed."""
    from torch._inductor.lowering import lowerings  # torch internals: what Inductor can lower

    table = inductor_decompositions()
    count = 0
    for node in list(gm.graph.nodes):
        op = node.target if node.op == "call_function" else None
        if op in table and op not in lowerings and getattr(op, "overloadpacket", None) in GEMM_PACKETS:
            inline_graph_node(gm, node, op)
            count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def all_static(node: fx.Node) -> bool:
    """Whether every tensor argument of ``node`` has static sizes and strides."""
    flat, _ = tree_flatten((node.args, node.kwargs))
    return all(is_static_value(a.meta.get("val")) for a in flat if isinstance(a, fx.Node))


def _codes_as_the_op(x: torch.Tensor, out: tuple) -> tuple:
    """The reference's outputs with the codes in the memory order the op (and its fake) gives
    a tensor of 3+ dims: ``x``'s. A convolution operand quantized per channel comes out of the
    channels-last matrix permuted; saved for the backward in that order, it broke the views
    the backward graph was traced with."""
    codes, *rest = out
    return (in_input_layout(x, codes) if x.dim() >= 3 else codes, *rest)


# the monitor probes' ops and the traceable functions they run (monitor_stats)
_MONITOR_BODIES = {
    monitor_codes_op: lambda x, c, s, z, o, key: quantizer_stats(x, c, s, z, o, QuantSpec.from_key(key)),
    monitor_fake_op: fake_quantizer_stats, monitor_error_op: error_stats, monitor_gradient_op: gradient_stats,
}


def _quantize_body(x, key, layout):
    return _codes_as_the_op(x, quantize_ref(x, QuantSpec.from_key(key), Layout(layout)))


def _bhq_quantize_body(x, key, layout):
    return _codes_as_the_op(x, bhq_quantize_ref(x, QuantSpec.from_key(key), Layout(layout)))


def _bhq_inverse_body(y, group, u, s, layout):
    return bhq_inverse_ref(y, group, u, s, Layout(layout))


def inline_quantize_ops(gm: fx.GraphModule) -> int:
    """Replace every quantize / BHQ node, and every probe of a monitored graph, by its traced
    reference: Inductor then fuses them with the ops around them (symbolic sizes included:
    :func:`trace_node`)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _MONITOR_BODIES:
            inline_graph_node(gm, node, _MONITOR_BODIES[node.target], traces=REFERENCE_TRACES)
            count += 1
            continue
        if node.target in QUANTIZE_OPS:
            inline_graph_node(gm, node, _quantize_body, traces=REFERENCE_TRACES)
            count += 1
        elif node.target is bhq_quantize_op:
            inline_graph_node(gm, node, _bhq_quantize_body, traces=REFERENCE_TRACES)
            count += 1
        elif node.target is bhq_inverse_op:
            inline_graph_node(gm, node, _bhq_inverse_body, traces=REFERENCE_TRACES)
            count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return count


def qmm_cpu_of_op_args(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype):
    """``qmm_cpu`` on ``fqt::qmm``'s flat arguments."""
    return qmm_cpu(QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob), bias, out_dtype)


def qbmm_cpu_of_op_args(a, sa, za, oa, b, sb, zb, ob, out_dtype):
    """``qbmm_cpu`` on ``fqt::qbmm``'s flat arguments, as traced for Inductor."""
    return qbmm_cpu(QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob), out_dtype, traced=True)


def inline_qmm_ops(gm: fx.GraphModule) -> int:
    """Replace every CPU int8 ``fqt::qmm`` by ``torch._int_mm`` plus its aten epilogue, every
    CPU int8 ``fqt::qbmm`` by batched GEMMs of the codes plus its epilogue, and every CPU int8
    ``fqt::qconv`` by ``fqt::conv_codes`` (oneDNN / ``torch._int_mm``) plus its epilogue
    (functionalized: it works in place): Inductor fuses the dequantization and the zero-point
    corrections with the ops that read the result."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (qmm_op, qbmm_op, qconv_op):
            continue
        codes = node.args[1] if node.target is qconv_op else node.args[0]
        b_codes = node.args[5] if node.target is qconv_op else node.args[4]
        on_cpu = node.meta["val"].device.type == "cpu"
        if not on_cpu or codes.meta["val"].dtype != torch.int8 or b_codes.meta["val"].dtype != torch.int8:
            continue
        if node.target is qmm_op:
            inline_graph_node(gm, node, qmm_cpu_of_op_args, traces=REFERENCE_TRACES)
        elif node.target is qbmm_op:
            inline_graph_node(gm, node, qbmm_cpu_of_op_args, traces=REFERENCE_TRACES)
        else:
            inline_graph_node(gm, node, qconv_cpu_of_op_args, functionalize=True, traces=REFERENCE_TRACES)
        count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return count


def replace_random(gm: fx.GraphModule) -> None:
    """Inductor's rewrite of random ops (``replace_random_passes``): Inductor's own compile_fx
    runs it before partitioning, a step our already-partitioned graphs skip."""
    # Inductor internals, imported on use: only Inductor-compiled graphs get here
    from torch._inductor.fx_passes.replace_random import replace_random_passes
    from torch._inductor.virtualized import V

    fake_mode = next(n.meta["val"].fake_mode for n in gm.graph.nodes if hasattr(n.meta.get("val"), "fake_mode"))
    with V.set_fake_mode(fake_mode):
        replace_random_passes(gm)


# Ops a reader fuses a recomputed dequantization into (Inductor inlines pointwise producers
# into them); any other reader keeps the one shared node.
_REDUCTIONS = {torch.ops.aten.amax.default, torch.ops.aten.amin.default, torch.ops.aten.sum.dim_IntList}


def _fuses(node: fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and (target in _REDUCTIONS or isinstance(target, torch._ops.OpOverload)
                                           and torch.Tag.pointwise in target.tags)


def _copy_chain(gm: fx.GraphModule, node: fx.Node, before: fx.Node) -> fx.Node:
    """A copy of the dequantization chain ending at ``node`` (``dequant_chain``'s ops) reading the
    same codes and statistics: the codes' producer is shared, never copied."""
    args = [_copy_chain(gm, a, before) if isinstance(a, fx.Node) and is_dequantization(a) else a for a in node.args]
    with gm.graph.inserting_before(before):
        copy = gm.graph.call_function(node.target, tuple(args), dict(node.kwargs))
    copy.meta.update(node.meta)
    return copy


def rematerialize_dequantizations(gm: fx.GraphModule) -> int:
    """Give each fusing reader of a dequantized 8-bit tensor (``codes * scale``, zero points and
    offsets included) its own copy of the dequantization, so that Inductor recomputes it from
    the 8-bit codes in each reader's loop instead of storing it in fp32: a requantization
    (the int8 recipe's weight-gradient activation, quantized per channel from the forward's
    per-sample codes) read it from an fp32 buffer in its statistics and codes passes, four
    bytes written and eight read per element where recomputing reads two. fqt compiles with
    ``realize_reads_threshold=1`` (a value read twice is stored, so a quantizer's expensive
    input is computed once), which these cheap values are better without."""
    count = 0
    for node in list(gm.graph.nodes):
        if len(node.users) < 2 or not is_dequantization(node) or not isinstance(match_operand(node), DequantOperand):
            continue
        for user in [u for u in node.users if _fuses(u)][1:]:
            user.replace_input_with(node, _copy_chain(gm, node, user))
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def record_input_strides(gm: fx.GraphModule) -> int:
    """Hold Inductor to the traced strides of the inputs of every fqt op tagged
    ``needs_exact_strides`` (the convolution kernels, which read their codes in the memory order
    of the step): Inductor applies that tag only where a node records the values its inputs were
    traced with, as ``eager_input_vals``, and a node a pass inserted has none. Returns how many."""
    count = 0
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace != "fqt" or torch.Tag.needs_exact_strides not in target.tags:
            continue
        node.meta["eager_input_vals"] = tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a,
                                                 (node.args, node.kwargs))
        count += 1
    return count
