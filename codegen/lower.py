"""Lowering: turn ``dequantize -> GEMM`` chains of a partitioned graph into low-bit GEMM calls.

Runs on the forward and backward graphs after partitioning (``execution="kernels"``). Convolution
GEMMs go to ``lower_conv``; for every matrix GEMM
the passes marked (``meta["fqt"]`` is a ``GemmNodeInfo``) it matches each operand back through
transposes / batch reshapes to the aten dequantization ``(codes - zp) * scale + offset`` of an
``fqt::quantize`` (forward graph) or of saved codes (backward graph), checks that the layout is
realizable -- A's statistics constant along K (per-tensor or per-row), B's constant along K
(per-tensor or per-column) -- and replaces the GEMM by ``fqt::qmm`` on the codes with the
dequantization in its epilogue. A GEMM that cannot be lowered stays simulated, and the reason
is recorded; nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fqt_compiler.ops import bhq_inverse_op
from fqt_compiler.layout import Layout
from fqt_compiler.sites import GemmNodeInfo, GemmStatus
from fqt_compiler.specs import GemmKind
from fqt_compiler.passes.dequant_chain import CONVERT, DequantOperand, match_operand
from fqt_compiler.passes.graph_utils import RESHAPES, TRANSPOSES, arg, call, replay_view

from fqt_compiler.ops import qmm_op
from fqt_compiler.int8_gemm import int8_gemm_name
from fqt_compiler.codegen.code_dtypes import FP8_NAMES, unsupported_codes
from fqt_compiler.codegen.lower_conv import CONV_TARGETS, lower_convolution

aten = torch.ops.aten

__all__ = ["LoweredGemm", "lower_gemms"]



@dataclass(frozen=True)
class LoweredGemm:
    """The codegen decision for one GEMM of one site."""

    site_id: int
    gemm: GemmKind
    status: GemmStatus
    reason: str = ""
    kernel: str = ""


def _shape(node: fx.Node) -> tuple:
    return tuple(node.meta["val"].shape)


def _replay_on_stat(
    graph: fx.Graph, stat: fx.Node | None, view: fx.Node, src_shape: tuple, like: fx.Node
) -> fx.Node | None | str:
    """Apply a view of the codes to a broadcastable statistic (None / scalar pass through)."""
    if stat is None:
        return None
    s_shape = _shape(stat)
    if len(s_shape) == 0 or all(d == 1 for d in s_shape) and view.target in RESHAPES:
        return stat
    if view.target in TRANSPOSES:
        return replay_view(graph, view, stat, like=like)
    target = tuple(_shape(view))
    if len(s_shape) != len(src_shape) or target[-1] != src_shape[-1]:
        return "operand reshape changes its last dim"
    if s_shape[-1] == 1:  # one value per row: rows are merged or split with the batch dims
        new = (*target[:-1], 1)
    elif all(d == 1 for d in s_shape[:-1]):  # one value per column
        new = (*(1,) * (len(target) - 1), target[-1])
    else:
        return "statistics do not survive the operand's reshape"
    return call(graph, aten.reshape.default, (stat, list(new)), like=like)


def _materialize(graph: fx.Graph, op: DequantOperand, like: fx.Node) -> tuple[fx.Node, list[fx.Node | None]] | str:
    codes, stats = op.codes, [op.scale, op.zp, op.offset]
    for view in op.views:
        src_shape = _shape(codes)
        codes = replay_view(graph, view, codes, like=like)
        new_stats = []
        for s in stats:
            r = _replay_on_stat(graph, s, view, src_shape, like)
            if isinstance(r, str):
                return r
            new_stats.append(r)
        stats = new_stats
    return codes, stats


def _check_layout(stats: list[fx.Node | None], axis: int, role: str) -> str | None:
    for s in stats:
        if s is None:
            continue
        shape = _shape(s)
        if len(shape) and shape[axis] != 1:
            which = "per-column" if axis == -1 else "per-row"
            return f"{role} scales are {which}: not constant along the contracted dim"
    return None


def _lower_one(gm: fx.GraphModule, node: fx.Node, info: GemmNodeInfo, device: torch.device) -> LoweredGemm:
    def simulated(reason: str) -> LoweredGemm:
        return LoweredGemm(info.site_id, info.gemm, GemmStatus.SIMULATED, reason)

    if node.target in CONV_TARGETS:
        lowered, text = lower_convolution(gm, node, info.gemm, device)
        if not lowered:
            return simulated(text)
        return LoweredGemm(info.site_id, info.gemm, GemmStatus.LOWBIT_KERNEL, kernel=text)
    if node.target not in (aten.mm.default, aten.addmm.default):
        return simulated("no low-bit batched GEMM kernel yet")
    a_idx, b_idx = (1, 2) if node.target is aten.addmm.default else (0, 1)
    if node.target is aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        return simulated("addmm with alpha/beta != 1")
    ops = []
    for idx in (a_idx, b_idx):
        m = match_operand(node.args[idx])
        if isinstance(m, str):
            return simulated(m)
        ops.append(m)
    bad = unsupported_codes(ops[0].spec.code_dtype, ops[1].spec.code_dtype, device)
    if bad:
        return simulated(bad)
    a_op, b_op = ops
    if b_op.transform is not None:
        return simulated("BHQ transform on the right operand: T^-1 does not commute with the GEMM there")
    if a_op.transform is not None and (a_op.views or arg(a_op.transform, "layout") != int(Layout.PENULTIMATE)):
        return simulated("BHQ rows are not the rows of the GEMM's left operand")
    graph = gm.graph
    with graph.inserting_before(node):
        mats = [_materialize(graph, o, node) for o in ops]
        for r in mats:
            if isinstance(r, str):
                return simulated(r)
        (a, sa), (b, sb) = mats
        for stats, axis, role in ((sa, -1, "lhs"), (sb, -2, "rhs")):
            bad = _check_layout(stats, axis, role)
            if bad:
                return simulated(bad)
        bias = node.args[0] if node.target is aten.addmm.default else None
        out_dtype = node.meta["val"].dtype
        if a_op.transform is None:
            new = call(graph, qmm_op, (a, sa[0], sa[1], sa[2], b, sb[0], sb[1], sb[2], bias, out_dtype), like=node)
        else:
            # BHQ: the GEMM runs on the codes of T dY; T^-1 acts on rows, so it commutes with
            # the right multiplication and is applied to the GEMM's output rows (O(M N)), then
            # the bias (docs/design.md, "Scale layouts": BHQ on grad_input).
            group, u, s_ = a_op.transform.args[1:4]
            acc = call(graph, qmm_op, (a, sa[0], sa[1], sa[2], b, sb[0], sb[1], sb[2], None, torch.float32), like=node)
            new = call(graph, bhq_inverse_op, (acc, group, u, s_, int(Layout.PENULTIMATE)), like=node)
            if bias is not None:
                new = call(graph, aten.add.Tensor, (new, bias), like=node)
            if out_dtype != torch.float32:
                new = call(graph, CONVERT, (new, out_dtype), like=node)
    new.meta["fqt"] = info
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    kernel = "triton qmm" if device.type == "cuda" else f"{int8_gemm_name()} + epilogue"
    if a_op.spec.code_dtype != b_op.spec.code_dtype:
        kernel += f" ({FP8_NAMES[a_op.spec.code_dtype]} x {FP8_NAMES[b_op.spec.code_dtype]})"
    if a_op.transform is not None:
        kernel += ", then T^-1 on the output rows"
    return LoweredGemm(info.site_id, info.gemm, GemmStatus.LOWBIT_KERNEL, kernel=kernel)


def lower_gemms(gm: fx.GraphModule) -> list[LoweredGemm]:
    """Lower every realizable quantized GEMM of ``gm`` in place; one record per GEMM."""
    results = []
    for node in list(gm.graph.nodes):
        info = node.meta.get("fqt")
        if node.op != "call_function" or not isinstance(info, GemmNodeInfo):
            continue
        device = next(
            (a.meta["val"].device for a in node.args if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)),
            torch.device("cpu"),
        )
        results.append(_lower_one(gm, node, info, device))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return results
