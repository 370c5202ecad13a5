"""Epilogue fusion: low-bit GEMMs absorb the pointwise ops that consume their output.

After prologue fusion (quantizers have taken the chains that feed them), every ``fqt::qmm``
whose output is read by exactly one pointwise op (through at most one view) grows a chain of
single-consumer pointwise consumers -- residual adds, activation functions, scalings, casts --
and becomes one ``fqt::qmm_epilogue`` call: the generated kernel (``kernels/qmm_epilogue.py``)
applies the chain to each output tile in registers and stores only its result.

:func:`fold_statistics` then gives a GEMM whose output a quantizer reads the statistics pass
of that quantizer (``fqt::qmm_epilogue_stats``): the epilogue applies the quantizer's chain to
the tile and stores exact partial max / min / NaN flags per output row or column.

Same scope rule as prologue fusion: CUDA graphs by default (on CPU, Inductor fuses the inlined
GEMM epilogue with its consumers), ``include_cpu=True`` for the interpreter in tests.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from fqt_compiler.layout import Layout
from fqt_compiler.specs import Granularity, QuantSpec, Scheme
from fqt_compiler.ops import QUANTIZE_OPS
from fqt_compiler.passes.graph_utils import (
    PURE_VIEWS, RESHAPES, TRANSPOSES, arg, arg_index, call, replay_view, rewire, static_tensor,
)

from fqt_compiler.codegen.prologue import fusable_quantize, identity_program
from fqt_compiler.fusion_program import OPS, Program, build_program, dtype_name
from fqt_compiler.memory_order import SAVED_LAYOUT
from fqt_compiler.ops import fused_quantize_op, qmm_epilogue_op, qmm_epilogue_stats_op, qmm_op

aten = torch.ops.aten

__all__ = ["FusedEpilogue", "fold_statistics", "fuse_epilogues"]




@dataclass(frozen=True)
class FusedEpilogue:
    """One GEMM that absorbed its consumers."""

    node: str
    ops: tuple[str, ...]
    program: Program
    stage: str = ""  # "forward" / "backward": node names repeat across the two graphs


def _absorbable(user: fx.Node, shape: torch.Size) -> bool:
    if user.op != "call_function" or user.target not in OPS:
        return False
    val = static_tensor(user)
    if val is None or dtype_name(val.dtype) is None or tuple(val.shape) != tuple(shape):
        return False
    return not (user.kwargs and set(user.kwargs) - {"approximate", "dtype"})


def _leaf_ok(node: fx.Node, shape: torch.Size) -> bool:
    val = static_tensor(node)
    if val is None or dtype_name(val.dtype) is None:
        return False
    try:
        return tuple(torch.broadcast_shapes(tuple(val.shape), tuple(shape))) == tuple(shape)
    except RuntimeError:
        return False


def fuse_epilogues(gm: fx.GraphModule, include_cpu: bool = False) -> list[FusedEpilogue]:
    """Replace ``qmm -> pointwise consumers`` by generated epilogue-fused GEMMs."""
    fused: list[FusedEpilogue] = []
    for q in list(gm.graph.nodes):
        if q.op != "call_function" or q.target is not qmm_op or len(q.users) != 1:
            continue
        qval = static_tensor(q)
        if qval is None or (qval.device.type != "cuda" and not include_cpu) or dtype_name(qval.dtype) is None:
            continue
        head = next(iter(q.users))
        if head.target in RESHAPES and len(head.users) == 1:
            start = head  # the GEMM output seen in the consumers' shape (a free view of it)
            head = next(iter(head.users))
        else:
            start = q
        shape = start.meta["val"].shape
        chain: list[fx.Node] = []
        leaves: list[fx.Node] = []
        current, user = start, head
        while _absorbable(user, shape):
            others = [a for a in user.args if isinstance(a, fx.Node) and a is not current]
            if any(a in chain or a is start for a in others) or not all(_leaf_ok(a, shape) for a in others):
                break
            chain.append(user)
            leaves.extend(a for a in others if a not in leaves)
            current = user
            if len(user.users) != 1:
                break  # the root may have several consumers; an interior value only one
            user = next(iter(user.users))
        if not chain:
            continue
        program = build_program(chain, lambda a: ("L", 0) if a is start else ("L", 1 + leaves.index(a)), shape, 1 + len(leaves))
        root = chain[-1]
        with gm.graph.inserting_before(root):
            new = call(gm.graph, qmm_epilogue_op, (*q.args, leaves, program.dumps()), like=root, fake_mode=qval.fake_mode)
        root.replace_all_uses_with(new)
        for n in reversed(chain):
            gm.graph.erase_node(n)
        if start is not q:
            gm.graph.erase_node(start)
        gm.graph.erase_node(q)
        fused.append(FusedEpilogue(new.name, tuple(str(n.target) for n in chain), program))
    gm.graph.lint()
    gm.recompile()
    return fused


def _gemm_behind(x: fx.Node) -> tuple[fx.Node, bool] | None:
    """The low-bit GEMM whose output ``x`` is -- directly, through views keeping its last dim
    (rows regrouped), and possibly then as a 2-D transpose -- and whether it is transposed."""
    g, transposed = x, False
    if g.op == "call_function" and g.target in TRANSPOSES and g.meta["val"].dim() == 2:
        g, transposed = g.args[0], True
    while g.op == "call_function" and g.target in RESHAPES:
        if tuple(g.meta["val"].shape)[-1:] != tuple(g.args[0].meta["val"].shape)[-1:]:
            return None
        g = g.args[0]
    if g.op == "call_function" and g.target in (qmm_op, qmm_epilogue_op):
        return g, transposed
    return None


def _grouped_axis(spec: QuantSpec, layout: int, shape: tuple, transposed: bool) -> str | None:
    """Which axis of the GEMM output the quantizer's grouped rows (one scale each) run along:
    "rows", "columns", "tensor" (one scale), or None where they are neither."""
    if spec.granularity is Granularity.TENSOR:
        return "tensor"
    if spec.granularity not in (Granularity.ROW, Granularity.COLUMN):
        return None
    lay = Layout(layout)
    if len(shape) != 2 and (transposed or lay is not Layout.PENULTIMATE):
        return None  # 3-D+: only rows of (tokens, features) merged from the leading dims
    natural_rows_are_gemm_rows = (lay is Layout.LAST) == transposed  # LAST transposes the natural matrix
    rows = natural_rows_are_gemm_rows == (spec.granularity is Granularity.ROW)
    return "rows" if rows else "columns"




def _defined_before(node, g: fx.Node, order: dict) -> bool:
    """Whether ``node`` is computed before ``g``, or is a chain of views of such a value."""
    if not isinstance(node, fx.Node) or order[node] < order[g]:
        return True
    return node.op == "call_function" and node.target in PURE_VIEWS and _defined_before(node.args[0], g, order)


def _replay_before(gm: fx.GraphModule, node: fx.Node, g: fx.Node, order: dict) -> fx.Node:
    """``node`` itself if computed before ``g``, else its view chain rebuilt before ``g``."""
    if order[node] < order[g]:
        return node
    base = _replay_before(gm, node.args[0], g, order)
    return replay_view(gm.graph, node, base)


def _leaf_first(steps: tuple, j: int, n_leaves: int) -> tuple:
    """``steps`` with leaves renumbered so leaf ``j`` comes first (the others keep their order)."""
    new_index = {old: new for new, old in enumerate([j, *(i for i in range(n_leaves) if i != j)])}
    return tuple((op, tuple(("L", new_index[o[1]]) if isinstance(o, tuple) and o[0] == "L" else o for o in operands), dt, extra)
                 for op, operands, dt, extra in steps)


def fold_statistics(gm: fx.GraphModule, include_cpu: bool = False) -> list[FusedEpilogue]:
    """The next quantizer's statistics pass folded into the GEMM epilogue producing its input.

    A quantizer reading a low-bit GEMM's output (directly, through a view, or transposed; after
    a pointwise chain of its own, whose other leaves -- a saved activation for an activation's
    derivative, a residual -- the epilogue loads at the tile) needs the statistics of its whole input
    before it can write a code: a first pass over the value, then the codes pass. Here the
    GEMM's epilogue -- which holds each output tile in registers anyway -- applies the
    quantizer's chain to the tile and stores partial statistics per output row (one slot per
    column tile) or per output column (one slot per row tile), whichever the quantizer's scales
    run along (per-tensor: per row); max / min / NaN flags, so exact. The quantizer reads its
    input once (writing its high-precision value, where others read it, in the codes pass).
    One quantizer per GEMM: the first in graph order."""
    folded: list[FusedEpilogue] = []
    for f in list(gm.graph.nodes):
        fold = _foldable(gm, f, include_cpu)
        if fold is not None:
            folded.append(_fold(gm, fold))
    gm.graph.lint()
    gm.recompile()
    return folded


@dataclass
class _Fold:
    """A quantizer ``f`` whose statistics the epilogue of GEMM ``g`` can gather."""

    f: fx.Node  # the quantizer (standalone, or a fused one without partials yet)
    g: fx.Node  # the low-bit GEMM (plain or epilogue-fused) producing leaf ``j`` of its input
    j: int
    transposed: bool  # the quantizer reads the GEMM's output transposed
    quant: Program  # the quantizer's own chain over its leaves
    others: list  # its other leaves
    key: str
    layout: int
    axis: str  # "rows" / "columns": what the partial statistics run along
    leaves: list  # the GEMM epilogue's own leaves and program
    program: Program
    order: dict  # node -> position in the graph, taken before the fold


def _quantizer_input(f: fx.Node) -> tuple[list, Program, str, int] | None:
    """(leaves, chain, spec key, layout) of a quantizer the epilogue can take statistics for."""
    if f.op != "call_function":
        return None
    if f.target is fused_quantize_op and arg(f, "partials") is None:
        return list(arg(f, "leaves")), Program.loads(arg(f, "program")), arg(f, "spec"), arg(f, "layout")
    if f.target in QUANTIZE_OPS and fusable_quantize(f):
        x = f.args[0]
        return [x], identity_program(x.meta["val"].shape, x.meta["val"].dtype), arg(f, "spec"), arg(f, "layout")
    return None


def _foldable(gm: fx.GraphModule, f: fx.Node, include_cpu: bool) -> _Fold | None:
    """What folding ``f``'s statistics into a GEMM epilogue takes, or None where it cannot."""
    found_input = _quantizer_input(f)
    if found_input is None:
        return None
    fleaves, quant, key, layout = found_input
    # the leaf that is a GEMM's whole output (other leaves: residuals, saved activations...)
    behind = [_gemm_behind(a) if isinstance(a, fx.Node) else None for a in fleaves]
    j, found = next(((i, b) for i, b in enumerate(behind) if b is not None), (0, None))
    gval = static_tensor(found[0]) if found is not None else None
    if (gval is None or tuple(fleaves[j].meta["val"].shape) != tuple(quant.shape)
            or (gval.device.type != "cuda" and not include_cpu)):
        return None
    g, transposed = found
    axis = _grouped_axis(QuantSpec.from_key(key), layout, tuple(f.meta["val"][0].shape), transposed)
    if axis is None:
        return None
    if g.target is qmm_op:
        if dtype_name(arg(g, "out_dtype")) is None:
            return None
        leaves, program = [], identity_program(gval.shape, arg(g, "out_dtype"))
    else:
        leaves, program = list(arg(g, "leaves")), Program.loads(arg(g, "program"))
    others = [a for i, a in enumerate(fleaves) if i != j]
    if (transposed and len(quant.shape) != 2) or any(static_tensor(a) is None for a in others):
        return None
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    if any(not _defined_before(a, g, order) for a in others):
        return None  # a leaf computed after the GEMM (and not a view of something before it)
    return _Fold(f, g, j, transposed, quant, others, key, layout, axis, leaves, program, order)


def _fold(gm: fx.GraphModule, fold: _Fold) -> FusedEpilogue:
    """Replace the GEMM by one that also stores the quantizer's partial statistics, and hand
    those to the quantizer."""
    g, f, quant = fold.g, fold.f, fold.quant
    fake_mode = g.meta["val"].fake_mode
    m, n = tuple(arg(g, "a").meta["val"].shape)[0], tuple(arg(g, "b").meta["val"].shape)[1]
    order = fold.order
    with gm.graph.inserting_before(g):
        # the quantizer's other leaves seen at the GEMM output's (row, column) positions
        qleaves = []
        for a in fold.others:
            t = call(gm.graph, aten.expand.default, (_replay_before(gm, a, g, order), list(quant.shape)), like=g)
            if fold.transposed:
                t = call(gm.graph, aten.t.default, (t,), like=g)
            qleaves.append(call(gm.graph, aten.reshape.default, (t, [m, n]), like=g))
        gquant = Program((m, n), _leaf_first(quant.steps, fold.j, quant.n_leaves), quant.n_leaves)
        gemm_args = g.args[:arg_index(qmm_op, "out_dtype") + 1]  # the qmm arguments every GEMM op starts with
        new = call(gm.graph, qmm_epilogue_stats_op, (*gemm_args, fold.leaves, fold.program.dumps(), gquant.dumps(),
                                                     QuantSpec.from_key(fold.key).scheme is Scheme.SYMMETRIC,
                                                     fold.axis == "columns", qleaves), like=g, fake_mode=fake_mode)
        out = call(gm.graph, operator.getitem, (new, 0), like=g)
        partials = call(gm.graph, operator.getitem, (new, 1), like=g)
    new.meta["fqt"] = g.meta.get("fqt")
    g.replace_all_uses_with(out)
    gm.graph.erase_node(g)
    f = _with_partials(gm, fold, partials, fake_mode)
    return FusedEpilogue(new.name, (f"statistics of {f.name}",), fold.program)


def _with_partials(gm: fx.GraphModule, fold: _Fold, partials: fx.Node, fake_mode) -> fx.Node:
    """The quantizer, now reading its statistics from ``partials``: a fused quantizer takes them
    as its ``partials`` argument; a standalone one becomes a fused one with an empty chain."""
    f = fold.f
    if f.target is fused_quantize_op:
        at = arg_index(fused_quantize_op, "partials")
        f.args = (*f.args[:at], partials, *f.args[at + 1:])
        return f
    shape = list(f.meta["val"][0].shape)
    with gm.graph.inserting_before(f):
        args = ([f.args[0]], fold.quant.dumps(), shape, fold.key, fold.layout, False, 0, partials)
        fq = call(gm.graph, fused_quantize_op, args, like=f, info=f.meta.get("fqt"), fake_mode=fake_mode)
    rewire(gm, f, fq, fake_mode, keep_meta=(SAVED_LAYOUT,))
    return fq
