"""Memory order of quantized codes: chosen so every low-bit GEMM reads its operands K-major.

A low-bit GEMM ``C = A @ B`` on sm_90 feeds ``wgmma`` from shared memory, which takes 8-bit
operands only K-major. Triton copies a K-major operand tile asynchronously (``cp.async``,
pipelined over ``num_stages``); an operand that is not K-major is loaded into registers,
byte-permuted and stored to shared memory on every iteration instead (``tools/ptx_layout.py``
shows both in the compiled PTX). Quantizers write codes contiguous in their input's shape, and
every right operand ``B`` (K x N) comes out N-major that way: a weight ``W^T`` in the forward,
``X`` and ``W`` in the backward. The codes' memory order is free, so the fused quantize kernel
writes them in the order their GEMM wants (:func:`choose_code_layouts`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from fqt_compiler.layout import Layout
from fqt_compiler.specs import GemmKind
from fqt_compiler.sites import GemmNodeInfo
from fqt_compiler.passes.dequant_chain import match_operand
from fqt_compiler.passes.graph_utils import RESHAPES, TRANSPOSES, arg, arg_index, call, fake_eval, replay_views, rewire

from fqt_compiler.codegen.epilogue import qmm_epilogue_op, qmm_epilogue_stats_op
from fqt_compiler.codegen.prologue import fusable_quantize, fused_quantize_op, identity_program
from fqt_compiler.ops import qmm_op
from fqt_compiler.memory_order import SAVED_LAYOUT, CodeLayout, alloc_like, column_major_ok

__all__ = ["LayoutChoice", "choose_code_layouts", "mark_saved_codes", "restride_inputs"]


# ---------------------------------------------------------------- the pass
def _is_view(node) -> bool:
    return node.op == "call_function" and (node.target in TRANSPOSES or node.target in RESHAPES)


def _uses(node, path=()) -> list[tuple[tuple, object, int | None]]:
    """Every read of ``node`` through views: (view path, reader, GEMM operand index or None)."""
    out = []
    for user in node.users:
        if user.op == "call_function" and user.target in (qmm_op, qmm_epilogue_op, qmm_epilogue_stats_op):
            for i, a in enumerate(user.args):
                if a is node:
                    out.append((path, user, i if i in (0, 4) else None))
        elif _is_view(user):
            out.extend(_uses(user, (*path, user)))
        else:
            out.append((path, user, None))
    return out


def _k_major(codes: torch.Tensor, path: tuple, operand: int) -> bool:
    """Whether GEMM operand ``operand`` (0: A, 4: B), the view ``path`` of ``codes`` (a meta
    tensor in some memory order), is read K-major: A with K along its columns, B along its rows.
    A reshape the strides cannot express as a view would copy: not K-major by this layout."""
    t = codes
    try:
        for view in path:
            if view.target in RESHAPES:
                t = t.view(view.args[1])  # raises where a reshape would have to copy
            else:
                t = view.target(t, *view.args[1:], **view.kwargs)
    except RuntimeError:
        return False
    if t.dim() != 2:
        return False
    k_axis = 1 if operand == 0 else 0
    return t.shape[k_axis] == 1 or t.stride(k_axis) == 1


@dataclass(frozen=True)
class LayoutChoice:
    """A quantizer whose codes are written in another memory order for the GEMMs reading them."""

    node: str
    layout: CodeLayout
    readers: tuple[str, ...]  # the GEMMs that now read K-major codes ("output": saved for the backward)
    stage: str = ""  # "forward" / "backward": node names repeat across the two graphs


def _refresh_downstream(gm: fx.GraphModule, changed: set) -> None:
    """Recompute the fake values computed from ``changed`` nodes (whose values were just given
    new strides), following only values whose layout actually changes."""
    changed = set(changed)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in changed or not any(a in changed for a in node.all_input_nodes):
            continue
        old = node.meta.get("val")
        node.meta["val"] = fake_eval(node.target, node.args, node.kwargs)
        if not _same_layout(old, node.meta["val"]):
            changed.add(node)


def _same_layout(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_layout(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.stride() == b.stride()
    return type(a) is type(b)


def choose_code_layouts(gm: fx.GraphModule, include_cpu: bool = False) -> list[LayoutChoice]:
    """Write every quantizer's codes in the memory order that lets the low-bit GEMMs reading
    them read K-major: column-major when every reader wants it, both orders (one kernel, two
    stores) when some reader needs the natural order (another GEMM, a graph output saved for
    the backward). Fused quantizers change their ``code_layout``; a standalone quantizer that
    needs a change becomes a fused one with an empty chain (the same kernel). Codes keep their
    values: only strides change."""
    choices = []
    for q in list(gm.graph.nodes):
        fused = q.op == "call_function" and q.target is fused_quantize_op
        if not (fused and arg(q, "code_layout") == int(CodeLayout.NATURAL) or fusable_quantize(q)):
            continue
        codes = _codes_of(q)
        if codes is None or (codes.meta["val"].device.type != "cuda" and not include_cpu):
            continue
        if not column_major_ok(tuple(codes.meta["val"].shape), Layout(arg(q, "layout"))):
            continue
        uses = _readers(codes)
        want = [u for u in uses if u[4] and not u[3]]
        if not want:
            continue
        choice = CodeLayout.COLUMN_MAJOR if all(u[4] for u in uses) else CodeLayout.BOTH
        q = _set_code_layout(gm, q, choice)
        if choice is CodeLayout.BOTH:
            _read_column_major_copy(gm, q, codes if fused else _codes_of(q), want)
        choices.append(LayoutChoice(q.name, choice, tuple(u[1].name for u in want)))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return choices


def _codes_of(q: fx.Node) -> fx.Node | None:
    """The ``getitem`` reading a quantizer's codes (output 0)."""
    return next((u for u in q.users if u.target is operator.getitem and u.args[1] == 0), None)


def _readers(codes: fx.Node) -> list[tuple]:
    """Every read of ``codes``: (view path, reader, GEMM operand or None, K-major in the natural
    order, K-major column-major)."""
    val = codes.meta["val"]
    shape = tuple(val.shape)
    nat = torch.empty(shape, dtype=val.dtype, device="meta")
    col = alloc_like(shape, val.dtype, "meta", True)
    saved_col = codes.meta.get(SAVED_LAYOUT) is CodeLayout.COLUMN_MAJOR  # read by the backward as B

    def wants(path, user, op) -> tuple[bool, bool]:
        if op is not None:
            return _k_major(nat, path, op), _k_major(col, path, op)
        if user.op == "output" and not path and saved_col:
            return False, True
        return True, False  # any other reader: the natural order

    return [(path, user, op, *wants(path, user, op)) for path, user, op in _uses(codes)]


def _set_code_layout(gm: fx.GraphModule, q: fx.Node, choice: CodeLayout) -> fx.Node:
    """The quantizer writing its codes in ``choice``: a fused one takes it as its ``code_layout``;
    a standalone one becomes the fused kernel with nothing to fuse."""
    if q.target is fused_quantize_op:
        q.update_arg(arg_index(fused_quantize_op, "code_layout"), int(choice))
    else:
        x, key, lay = q.args
        shape = x.meta["val"].shape
        with gm.graph.inserting_before(q):
            args = ([x], identity_program(shape, x.meta["val"].dtype).dumps(), list(shape), key, lay, False, int(choice))
            new = call(gm.graph, fused_quantize_op, args, like=q, info=q.meta.get("fqt"))
        rewire(gm, q, new, x.meta["val"].fake_mode, keep_meta=(SAVED_LAYOUT,))
        q = new
    q.meta["val"] = fake_eval(q.target, q.args, q.kwargs)
    _refresh_downstream(gm, {q})
    return q


def _read_column_major_copy(gm: fx.GraphModule, q: fx.Node, codes: fx.Node, want: list[tuple]) -> None:
    """Point the readers that want column-major codes at the quantizer's second copy."""
    with gm.graph.inserting_after(q):
        codes2 = call(gm.graph, operator.getitem, (q, 5), like=q)
    for path, user, op, _, _ in want:
        if user.op == "output":  # saved for the backward in the order it reads
            user.replace_input_with(codes, codes2)
            continue
        operand = codes2
        with gm.graph.inserting_before(user):
            operand = replay_views(gm.graph, list(path), operand)
        user.update_arg(op, operand)


# ---------------------------------------------------------------- codes saved for the backward


def mark_saved_codes(joint: fx.GraphModule) -> int:
    """On the joint graph (before partitioning), mark the forward codes that a backward GEMM
    reads -- through its dequantization and views, as lowering will match it -- K-major only
    when they are column-major: an activation's codes reused as ``B`` (K = tokens) of its
    weight-gradient GEMM. The forward graph, compiled first, then saves them column-major (and
    keeps natural ones for its own GEMM: both orders from one kernel); the backward graph's
    input takes the saved strides (``FQTBackend``). Returns how many codes were marked."""
    marked = 0
    for node in joint.graph.nodes:
        info = node.meta.get("fqt")
        if node.op != "call_function" or not isinstance(info, GemmNodeInfo) or info.gemm is GemmKind.OUTPUT:
            continue
        if node.target not in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            continue
        first = 1 if node.target is torch.ops.aten.addmm.default else 0
        for position, operand in ((first, 0), (first + 1, 4)):
            m = match_operand(node.args[position])
            if isinstance(m, str) or m.transform is not None:
                continue
            codes = m.codes
            val = codes.meta.get("val")
            if (codes.target is not operator.getitem or not isinstance(val, torch.Tensor) or val.dim() != 2
                    or not val.is_contiguous()):
                continue
            shape = tuple(val.shape)
            nat = torch.empty(shape, dtype=val.dtype, device="meta")
            col = alloc_like(shape, val.dtype, "meta", True)
            if not _k_major(nat, tuple(m.views), operand) and _k_major(col, tuple(m.views), operand):
                codes.meta[SAVED_LAYOUT] = CodeLayout.COLUMN_MAJOR
                marked += 1
    return marked


def restride_inputs(gm: fx.GraphModule, strides: dict[str, tuple[int, ...]], example_inputs: list) -> list:
    """Give the placeholders named in ``strides`` (tensors the forward graph saved in another
    memory order) those strides, in their fake values and the values computed from them;
    returns a copy of ``example_inputs`` with those strides too."""
    example_inputs = list(example_inputs)
    changed: set = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, ph in enumerate(placeholders):
        val = ph.meta.get("val")
        if ph.name not in strides or not isinstance(val, torch.Tensor) or len(strides[ph.name]) != val.dim():
            continue
        with val.fake_mode:
            new = torch.empty_strided(tuple(val.shape), strides[ph.name], dtype=val.dtype, device=val.device)
        ph.meta["val"] = new
        if i < len(example_inputs) and isinstance(example_inputs[i], torch.Tensor):
            example_inputs[i] = new
        changed.add(ph)
    _refresh_downstream(gm, changed)
    return example_inputs
