"""Instrument a partitioned graph for numerics monitoring: probes whose results become extra outputs.

Runs on the forward and backward graphs of a *monitored variant* (``fqt_compiler.monitor``)
before any lowering, where every quantizer is still an ``fqt::quantize*`` node and every GEMM
still the aten op it was, reading dequantized operands (``meta["fqt"]`` tells which). It adds:

* a **quantizer probe** after every quantize op of a high-precision tensor: codes, scales,
  saturation (forward and backward; not the re-quantizations of already quantized values);
* a **forward probe** per forward GEMM: the same GEMM on the high-precision inputs of its
  quantizers, against the quantized one (relative error, SQNR);
* a **gradient probe** per weight-gradient GEMM whose ``grad_output`` is quantized: the same
  GEMM with that quantizer drawn again (own quantization variance), with the exact
  ``grad_output`` on each half of the batch (sampling variance; their sum is the QAT gradient,
  Theorem 1's check), and, when asked, its value in a second copy of the whole backward with
  every gradient quantizer drawn afresh (total quantization variance).

The GEMMs it adds carry no ``meta["fqt"]``, so the lowering leaves them in high precision and
lowers the watched GEMMs exactly as in the unmonitored graph. Each probe's vector is appended to
the graph's outputs, in the order of the returned :class:`Probe` list; the caller strips them.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass

import torch
from torch import fx

from fqt_compiler.ops import monitor_codes_op, monitor_error_op, monitor_fake_op, monitor_gradient_op
from fqt_compiler.ops import QUANTIZE_OPS, bhq_quantize_op, fake_quantize_op
from fqt_compiler.passes.dequant_chain import match_operand
from fqt_compiler.passes.graph_utils import call
from fqt_compiler.sites import GemmNodeInfo, QuantNodeInfo, QuantNodeKind
from fqt_compiler.specs import GemmKind, TensorRole

aten = torch.ops.aten

__all__ = ["ProbeKind", "Probe", "instrument_graph"]

_CODE_OPS = (*QUANTIZE_OPS, bhq_quantize_op)
_QUANTIZERS = (*_CODE_OPS, fake_quantize_op)


class ProbeKind(enum.Enum):
    QUANTIZER = "quantizer"
    FORWARD = "forward"
    GRADIENT = "gradient"


@dataclass(frozen=True)
class Probe:
    """One extra output of a monitored graph: what it measures and where."""

    kind: ProbeKind
    site_id: int
    gemm: GemmKind
    stage: str  # "forward" / "backward": the graph it runs in
    role: TensorRole | None = None  # quantizer probes: the operand quantized
    spec: str = ""  # quantizer probes: the spec key
    note: str = ""  # what could not be measured, and why


def _info(node: fx.Node):
    return node.meta.get("fqt") if isinstance(node, fx.Node) else None


def _quantizer_of(arg: fx.Node) -> fx.Node | None:
    """The quantize op a GEMM operand comes from: the operand itself for a quantize-dequantize op,
    else the op whose codes the dequantization chain (``dequant_chain.match_operand``) reads;
    None for codes made elsewhere (the forward's, saved for the backward)."""
    if isinstance(arg, fx.Node) and arg.target is fake_quantize_op:
        return arg
    match = match_operand(arg)
    if isinstance(match, str) or match.views:
        return None
    codes = match.codes
    if codes.op == "call_function" and codes.target is operator.getitem and codes.args[0].target in _CODE_OPS:
        return codes.args[0]
    return None


def _closure(start: fx.Node, step) -> set[fx.Node]:
    out, frontier = set(), [start]
    while frontier:
        n = frontier.pop()
        if n not in out:
            out.add(n)
            frontier.extend(step(n))
    return out


def _between(top: fx.Node, bottom: fx.Node) -> list[fx.Node]:
    """The nodes on paths from ``top`` (a quantizer) to ``bottom`` (the GEMM operand its
    dequantization makes), both included, in graph order: what a second draw re-runs."""
    chain = lambda n: [u for u in n.users if isinstance(_info(u), QuantNodeInfo)]  # noqa: E731
    below = _closure(top, chain)
    above = _closure(bottom, lambda n: [a for a in n.all_input_nodes if a in below])
    return [n for n in top.graph.nodes if n in above]


def _copy_chain(graph: fx.Graph, nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Copies of ``nodes`` (a quantizer and its dequantization): a fresh draw of a stochastic one."""
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env.get(a, a))
        env[n].meta.pop("fqt", None)
    return env


def _gemm_copy(graph: fx.Graph, gemm: fx.Node, args: tuple) -> fx.Node:
    return call(graph, gemm.target, args, dict(gemm.kwargs), like=gemm)


def _output_of(graph: fx.Graph, gemm: fx.Node) -> fx.Node:
    """The tensor a GEMM node computes (``convolution_backward``: its weight gradient)."""
    if gemm.target is aten.convolution_backward.default:
        return call(graph, operator.getitem, (gemm, 1))
    return gemm


def _quantizer_probe(graph: fx.Graph, q: fx.Node, stage: str) -> tuple[Probe, fx.Node]:
    info: QuantNodeInfo = _info(q)
    x = q.args[0]
    if q.target is fake_quantize_op:
        out = call(graph, monitor_fake_op, (x, q))
    else:
        items = [call(graph, operator.getitem, (q, i)) for i in range(4)]
        out = call(graph, monitor_codes_op, (x, *items, info.spec_key))
    return Probe(ProbeKind.QUANTIZER, info.site_id, info.gemm, stage, info.role, info.spec_key), out


def _hp_args(gemm: fx.Node, info: GemmNodeInfo, roles: set[TensorRole] | None = None) -> tuple | None:
    """The GEMM's arguments with the quantized operands (of ``roles``; all when None) replaced by
    the high-precision tensors their quantizers read; None where that cannot be done."""
    args = list(gemm.args)
    for i in info.quantized_args:
        a = args[i]
        qinfo = _info(a)
        if roles is not None and not (isinstance(qinfo, QuantNodeInfo) and qinfo.role in roles):
            continue
        q = _quantizer_of(a)
        if q is None or tuple(q.args[0].meta["val"].shape) != tuple(a.meta["val"].shape):
            return None
        args[i] = q.args[0]
    return tuple(args)


def _split_point(graph: fx.Graph, node: fx.Node, dim: int) -> tuple[object, object] | None:
    """(half, size) of ``node``'s ``dim``: ints, or graph nodes reading a symbolic size at run time."""
    size = node.meta["val"].shape[dim]
    if isinstance(size, int):
        return (size // 2, size) if size >= 2 else None
    mode = node.meta["val"].fake_mode
    n = call(graph, aten.sym_size.int, (node, dim), fake_mode=mode)
    return call(graph, operator.floordiv, (n, 2), fake_mode=mode), n


def _halves(graph: fx.Graph, gemm: fx.Node, args: tuple) -> tuple[fx.Node, fx.Node] | None:
    """The GEMM on each half of the batch (its reduction over samples split in two)."""
    if gemm.target is aten.mm.default:
        cuts = ((0, 1), (1, 0))  # A's columns and B's rows run over the samples
    elif gemm.target is aten.convolution_backward.default:
        cuts = ((0, 0), (1, 0))  # grad_output's and input's batch dim
    else:
        return None
    point = _split_point(graph, args[cuts[0][0]], cuts[0][1])
    if point is None:
        return None
    h, size = point
    parts = []
    for lo, hi in ((0, h), (h, size)):
        new = list(args)
        for i, dim in cuts:
            new[i] = call(graph, aten.slice.Tensor, (args[i], dim, lo, hi))
        parts.append(_output_of(graph, _gemm_copy(graph, gemm, tuple(new))))
    return parts[0], parts[1]


def _gradient_probe(graph: fx.Graph, gemm: fx.Node, info: GemmNodeInfo, second: dict) -> tuple[Probe, fx.Node] | None:
    grad_pos = [i for i in info.quantized_args if getattr(_info(gemm.args[i]), "role", None) is TensorRole.GRAD_OUTPUT]
    if len(grad_pos) != 1:
        return None
    pos = grad_pos[0]
    q = _quantizer_of(gemm.args[pos])
    exact = _hp_args(gemm, info, {TensorRole.GRAD_OUTPUT})
    if q is None or exact is None:
        return None
    env = _copy_chain(graph, _between(q, gemm.args[pos]))
    redraw_args = tuple(env.get(a, a) if i == pos else a for i, a in enumerate(gemm.args))
    g = _output_of(graph, gemm)
    redraw = _output_of(graph, _gemm_copy(graph, gemm, redraw_args))
    halves = _halves(graph, gemm, exact)
    notes = []
    if halves is not None:  # the exact gradient is the sum of its halves' (one GEMM fewer)
        g_exact = call(graph, aten.add.Tensor, halves)
    else:
        g_exact = _output_of(graph, _gemm_copy(graph, gemm, exact))
        notes.append("no sampling variance (a single-sample batch, or a batched GEMM)")
    g_second = second.get(gemm)
    if g_second is not None:
        g_second = _output_of(graph, g_second)
    elif second:
        notes.append("no total variance (this GEMM has no twin in the second backward)")
    half_a, half_b = halves if halves is not None else (None, None)
    # the weight gradient's axis of grad_output's channels: mm(dY^T, X) has them as rows,
    # mm(X^T, dY) as columns; a convolution's weight gradient as dim 0
    axis = 1 if gemm.target is aten.mm.default and pos == 1 else 0
    out = call(graph, monitor_gradient_op, (g, redraw, g_exact, half_a, half_b, g_second, axis))
    return Probe(ProbeKind.GRADIENT, info.site_id, info.gemm, "backward", note="; ".join(notes)), out


def _side_effect(node: fx.Node) -> bool:
    """Whether running ``node`` twice would do more than compute twice (random draws are fine)."""
    tags = getattr(node.target, "tags", ())
    return node.is_impure() and torch.Tag.nondeterministic_seeded not in tags


def _second_backward(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """A copy of every computing node of the backward graph, placed before its output: the whole
    backward again, every stochastic quantizer drawing afresh. Empty if a node has side effects."""
    graph = gm.graph
    body = [n for n in graph.nodes if n.op == "call_function"]
    if any(_side_effect(n) for n in body):
        return {}
    env: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(next(n for n in graph.nodes if n.op == "output")):
        for n in body:
            env[n] = graph.node_copy(n, lambda a: env.get(a, a))
            env[n].meta.pop("fqt", None)
    return env


def instrument_graph(gm: fx.GraphModule, stage: str, total_variance: bool = False) -> list[Probe]:
    """Add every probe to ``gm`` (a ``"forward"`` or ``"backward"`` graph, not yet lowered) and
    append their vectors to its outputs; returns the probes in output order. ``total_variance``:
    also run the backward a second time (the gradient probes' ``total_var``)."""
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    second = _second_backward(gm) if stage == "backward" and total_variance else {}
    probes: list[tuple[Probe, fx.Node]] = []
    originals = [n for n in graph.nodes if n.op == "call_function" and n not in second.values()]
    for n in originals:
        info = _info(n)
        with graph.inserting_before(output):
            if n.target in _QUANTIZERS and isinstance(info, QuantNodeInfo) and info.what is QuantNodeKind.QUANTIZE:
                # a backward GEMM re-quantizing the forward's quantized values (another layout)
                # has nothing to say that the forward's probe did not
                if not isinstance(_info(n.args[0]), QuantNodeInfo):
                    probes.append(_quantizer_probe(graph, n, stage))
            elif isinstance(info, GemmNodeInfo) and info.gemm is GemmKind.OUTPUT and stage == "forward":
                args = _hp_args(n, info)
                if args is not None:
                    ref = _gemm_copy(graph, n, args)
                    probes.append((Probe(ProbeKind.FORWARD, info.site_id, info.gemm, stage),
                                   call(graph, monitor_error_op, (n, ref))))
            elif isinstance(info, GemmNodeInfo) and info.gemm is GemmKind.GRAD_WEIGHT and stage == "backward":
                made = _gradient_probe(graph, n, info, second)
                if made is not None:
                    probes.append(made)
    outs = output.args[0]
    output.args = ((*outs, *(node for _, node in probes)),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return [p for p, _ in probes]
