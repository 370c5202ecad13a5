"""Lowering: turn ``dequantize -> GEMM`` chains of a partitioned graph into low-bit GEMM calls.

Runs on the forward and backward graphs after partitioning (``execution="kernels"``). Convolution
GEMMs go to ``lower_conv``; for every matrix GEMM (``mm`` / ``addmm``, and ``bmm`` / ``baddbmm``,
which become the batched ``fqt::qbmm``) the passes marked (``meta["fqt"]`` is a
``GemmNodeInfo``) it matches each operand back through transposes / batch reshapes to the aten
dequantization ``(codes - zp) * scale + offset`` of an
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
from fqt_compiler.passes.matchers import BATCHED_MATMULS, MATMUL_OPERANDS

from fqt_compiler.ops import qbmm_op, qmm_op
from fqt_compiler.int8_gemm import INT_MM, int8_bmm_runs_int_mm, int8_gemm_name
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


def _lower_one(gm: fx.GraphModule, node: fx.Node, info: GemmNodeInfo, device: torch.device, inductor: bool) -> LoweredGemm:
    def simulated(reason: str) -> LoweredGemm:
        return LoweredGemm(info.site_id, info.gemm, GemmStatus.SIMULATED, reason)

    if node.target in CONV_TARGETS:
        lowered, text = lower_convolution(gm, node, info.gemm, device)
        if not lowered:
            return simulated(text)
        return LoweredGemm(info.site_id, info.gemm, GemmStatus.LOWBIT_KERNEL, kernel=text)
    if node.target not in MATMUL_OPERANDS:
        return simulated(f"no low-bit kernel for {node.target}")
    a_idx, b_idx = MATMUL_OPERANDS[node.target]
    batched = node.target in BATCHED_MATMULS
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
    if a_op.transform is not None and batched:
        # T^-1 mixes rows of different batch entries, which the GEMM multiplies by different matrices
        return simulated("BHQ transform on a batched GEMM: T^-1 mixes batch entries and does not commute with the GEMM")
    graph = gm.graph
    with graph.inserting_before(node):
        mats = [_materialize(graph, o, node) for o in ops]
        for r in mats:
            if isinstance(r, str):
                return simulated(r)
        (a, sa), (b, sb) = mats
        for stats, axis, role in ((sa, -1, "lhs"), (sb, -2, "rhs")):
            bad = _check_layout(stats, axis, role) or (_check_batched(stats, role) if batched else None)
            if bad:
                return simulated(bad)
        new = _emit(graph, node, (a, *sa), (b, *sb), a_op.transform, batched)
    new.meta["fqt"] = info
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return LoweredGemm(info.site_id, info.gemm, GemmStatus.LOWBIT_KERNEL, kernel=_kernel_name(node, a_op, b_op, device, inductor))


def _check_batched(stats: list[fx.Node | None], role: str) -> str | None:
    """A batched GEMM's statistics: per tensor or one 3-D (batch, row, column) broadcast each."""
    for s in stats:
        if s is not None and len(_shape(s)) not in (0, 3) and not all(d == 1 for d in _shape(s)):
            return f"{role} statistics of a batched GEMM are not per tensor or per (batch, row / column)"
    return None


def _emit(graph: fx.Graph, node: fx.Node, a: tuple, b: tuple, transform: fx.Node | None, batched: bool) -> fx.Node:
    """The low-bit GEMM standing in for ``node``, and what ``node`` adds around the product:
    ``addmm`` / ``baddbmm``'s input (scaled by ``beta``; a Linear's bias vector rides in the
    GEMM's epilogue), ``alpha``, BHQ's inverse transform on the output rows."""
    out_dtype = node.meta["val"].dtype
    inp = node.args[0] if MATMUL_OPERANDS[node.target][0] == 1 else None  # addmm / baddbmm: the input first
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    n = _shape(node)[-1]
    vector_bias = inp is not None and not batched and alpha == 1 and beta == 1 and _shape(inp) == (n,)

    def gemm(bias, dtype):
        if batched:
            return call(graph, qbmm_op, (*a, *b, dtype), like=node)
        return call(graph, qmm_op, (*a, *b, bias, dtype), like=node)

    if transform is None and alpha == 1 and (inp is None or vector_bias):
        return gemm(inp, out_dtype)
    new = gemm(None, torch.float32)
    if transform is not None:
        # BHQ: the GEMM runs on the codes of T dY; T^-1 acts on rows, so it commutes with the
        # right multiplication and is applied to the GEMM's output rows (O(M N)), then the
        # bias (docs/design.md, "Scale layouts": BHQ on grad_input).
        group, u, s_ = transform.args[1:4]
        new = call(graph, bhq_inverse_op, (new, group, u, s_, int(Layout.PENULTIMATE)), like=node)
    if alpha != 1:
        new = call(graph, aten.mul.Tensor, (new, alpha), like=node)
    if inp is not None and beta != 0:  # beta = 0 ignores the input, NaN included (torch's rule)
        scaled = inp if beta == 1 else call(graph, aten.mul.Tensor, (inp, beta), like=node)
        new = call(graph, aten.add.Tensor, (new, scaled), like=node)
    if out_dtype != torch.float32:
        new = call(graph, CONVERT, (new, out_dtype), like=node)
    return new


def _kernel_name(node: fx.Node, a_op: DequantOperand, b_op: DequantOperand, device: torch.device, inductor: bool) -> str:
    """How the decision table names the kernel a lowered GEMM runs on."""
    if node.target not in BATCHED_MATMULS:
        kernel = "triton qmm" if device.type == "cuda" else f"{int8_gemm_name()} + epilogue"
    elif device.type == "cuda":
        kernel = "triton qbmm (batched)"
    else:  # under Inductor the trace runs batched GEMMs of the codes (``cpu_gemm.qbmm_cpu``)
        m, n = _shape(node)[-2:]
        per_entry = not inductor and isinstance(m, int) and isinstance(n, int) and int8_bmm_runs_int_mm(device, m, n)
        kernel = f"batched {INT_MM} per entry + epilogue" if per_entry else \
            "batched int8 GEMM on fp32 units (exact int32 sums) + epilogue"
    if a_op.spec.code_dtype != b_op.spec.code_dtype:
        kernel += f" ({FP8_NAMES[a_op.spec.code_dtype]} x {FP8_NAMES[b_op.spec.code_dtype]})"
    if a_op.transform is not None:
        kernel += ", then T^-1 on the output rows"
    return kernel


def lower_gemms(gm: fx.GraphModule, inductor: bool = False) -> list[LoweredGemm]:
    """Lower every realizable quantized GEMM of ``gm`` in place; one record per GEMM.
    ``inductor``: the graph goes on to Inductor (which changes how a CPU batched GEMM runs)."""
    results = []
    for node in list(gm.graph.nodes):
        info = node.meta.get("fqt")
        if node.op != "call_function" or not isinstance(info, GemmNodeInfo):
            continue
        device = next(
            (a.meta["val"].device for a in node.args if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)),
            torch.device("cpu"),
        )
        results.append(_lower_one(gm, node, info, device, inductor))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return results
