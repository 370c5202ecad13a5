"""Lowering of convolution GEMMs: ``dequantize -> convolution`` (forward) and the split
``dequantize -> convolution_backward`` nodes (dgrad, wgrad) become ``fqt::qconv`` calls.

The legality rules are those of ``fqt_compiler.conv`` (docs/design.md, "Scale layouts"): each
operand's statistics may vary only along the one axis of it that survives into the result.
A convolution that cannot be lowered stays simulated with the reason, never dropped silently.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from fqt_compiler.codegen.code_dtypes import unsupported_codes
from fqt_compiler.conv import ConvGeometry, is_channels_last, layout_problem
from fqt_compiler.int8_gemm import int8_gemm_name
from fqt_compiler.ops import CONV_KINDS, qconv_op
from fqt_compiler.layout import Layout
from fqt_compiler.ops import bhq_inverse_op
from fqt_compiler.specs import GemmKind
from fqt_compiler.passes.dequant_chain import CONVERT, DequantOperand, match_operand
from fqt_compiler.passes.graph_utils import arg, call
from fqt_compiler.passes.sym_sizes import size_args

aten = torch.ops.aten

__all__ = ["CONV_TARGETS", "lower_convolution"]

CONV_TARGETS = (aten.convolution.default, aten.convolution_backward.default)


def _shape(n: fx.Node) -> tuple:
    return tuple(n.meta["val"].shape)


# A transposed convolution's GEMMs are those of the convolution it transposes, in another order:
# its forward is that convolution's dgrad, its dgrad that convolution's forward, and its wgrad
# that convolution's wgrad with the operands' roles swapped (its input plays dY).
_TRANSPOSED = {
    GemmKind.OUTPUT: GemmKind.GRAD_INPUT, GemmKind.GRAD_INPUT: GemmKind.OUTPUT, GemmKind.GRAD_WEIGHT: GemmKind.GRAD_WEIGHT,
}


def _operands(node: fx.Node, kind: GemmKind) -> tuple[GemmKind, fx.Node, fx.Node, fx.Node]:
    """(the GEMM of a plain convolution it computes, a, b, the node whose value is its result)."""
    transposed = bool(arg(node, "transposed"))
    if node.target is aten.convolution.default:
        return (_TRANSPOSED[kind] if transposed else kind), node.args[0], node.args[1], node
    out_idx = 0 if kind is GemmKind.GRAD_INPUT else 1
    result = next(u for u in node.users if u.target is operator.getitem and u.args[1] == out_idx)
    if kind is GemmKind.GRAD_INPUT:
        return (_TRANSPOSED[kind] if transposed else kind), node.args[0], node.args[2], result
    a, b = (node.args[1], node.args[0]) if transposed else (node.args[0], node.args[1])
    return kind, a, b, result


def _device_problem(device: torch.device, geo_dims: int) -> str | None:
    if device.type == "cuda":
        return None if geo_dims <= 3 else f"{geo_dims}-D convolution: the Triton kernels take 1-D to 3-D"
    if device.type != "cpu":
        return f"no low-bit convolution kernel on {device.type}"
    from fqt_compiler.codegen.kernels.conv_cpu import onednn_problem

    return onednn_problem()


def _check(kind: GemmKind, ops: list[DequantOperand], device: torch.device) -> str | None:
    """Why the GEMM ``kind`` (of a plain convolution) on these operands stays simulated."""
    a_op, b_op = ops
    bad = _device_problem(device, a_op.codes.meta["val"].dim() - 2)
    if bad:
        return bad
    for o in ops:
        if o.views:
            return "a convolution operand reaches it through view ops: its statistics cannot follow"
    bad = unsupported_codes(a_op.spec.code_dtype, b_op.spec.code_dtype, device)
    if bad:
        return bad
    if b_op.transform is not None:
        return "BHQ transform on the right operand: T^-1 does not commute with the convolution there"
    if a_op.transform is not None and kind is GemmKind.GRAD_WEIGHT:
        return "BHQ on grad_weight: T^-1 acts on grad_output's samples, which the weight gradient contracts"
    if a_op.transform is not None and arg(a_op.transform, "layout") != int(Layout.DIM0):
        return "BHQ rows are not the samples of grad_output"
    return None


def _kernel_name(kind: GemmKind, device: torch.device, geo: ConvGeometry) -> str:
    if device.type == "cuda":
        wgrad = "fp64 batched GEMM of the codes per kernel offset (grouped wgrad, exact)" if geo.small_groups else \
            "triton qmm per kernel offset (wgrad)"
        return {GemmKind.OUTPUT: "triton implicit GEMM", GemmKind.GRAD_INPUT: "triton implicit GEMM (dgrad)",
                GemmKind.GRAD_WEIGHT: wgrad}[kind]
    return {GemmKind.OUTPUT: "oneDNN int8 conv", GemmKind.GRAD_INPUT: "oneDNN int8 conv (dgrad)",
            GemmKind.GRAD_WEIGHT: f"{int8_gemm_name()} per kernel offset (wgrad)"}[kind]


def lower_convolution(gm: fx.GraphModule, node: fx.Node, kind: GemmKind, device: torch.device) -> tuple[bool, str]:
    """Replace one convolution GEMM by ``fqt::qconv`` in place: (True, kernel) when lowered,
    (False, reason) when it stays simulated. A transposed convolution's GEMM runs as the GEMM of
    the plain convolution it transposes (``_TRANSPOSED``)."""
    transposed = bool(arg(node, "transposed"))
    kind, a_arg, b_arg, result = _operands(node, kind)
    ops = []
    for x in (a_arg, b_arg):
        m = match_operand(x)
        if isinstance(m, str):
            return False, m
        ops.append(m)
    bad = _check(kind, ops, device)
    if bad:
        return False, bad
    a_op, b_op = ops
    stride, padding, dilation, groups = (list(arg(node, n)) if n != "groups" else arg(node, n)
                                         for n in ("stride", "padding", "dilation", "groups"))
    a_stats, b_stats = ([s for s in (o.scale, o.zp, o.offset)] for o in ops)
    out_shape = _shape(result)
    geo = ConvGeometry.of_call(kind, _shape(a_op.codes), _shape(b_op.codes), out_shape, stride, padding, dilation, groups)
    shapes = [[None if s is None else _shape(s) for s in stats] for stats in (a_stats, b_stats)]
    bad = layout_problem(kind, geo, *shapes)
    if bad:
        return False, f"transposed convolution, run as the {kind.value} of the one it transposes: {bad}" if transposed else bad
    bias = node.args[2] if node.target is aten.convolution.default else None
    out_dtype = result.meta["val"].dtype
    graph = gm.graph
    with graph.inserting_before(node):
        shape_arg = size_args(graph, out_shape, like=result)
        if isinstance(shape_arg, str):
            return False, f"symbolic result size: {shape_arg}"
        bhq = a_op.transform is not None
        args = (CONV_KINDS.index(kind), a_op.codes, *a_stats, b_op.codes, *b_stats, None if bhq else bias,
                stride, padding, dilation, groups, shape_arg, torch.float32 if bhq else out_dtype,
                is_channels_last(result.meta["val"]))
        new = call(graph, qconv_op, args, like=result)
        if bhq:  # GEMM on the codes of T dY; a per-sample map, so T^-1 acts on the result's samples (rows)
            group, u, s_ = a_op.transform.args[1:4]
            new = call(graph, bhq_inverse_op, (new, group, u, s_, int(Layout.DIM0)), like=result)
            if bias is not None:  # after T^-1, which must not mix it across samples
                new = call(graph, aten.add.Tensor, (new, call(graph, aten.reshape.default, (bias, [1, -1, *[1] * geo.spatial]),
                                                              like=result)), like=result)
            if out_dtype != torch.float32:
                new = call(graph, CONVERT, (new, out_dtype), like=result)
    new.meta["fqt"] = node.meta["fqt"]
    result.replace_all_uses_with(new)
    if result is not node:
        graph.erase_node(result)
        if not node.users:
            graph.erase_node(node)
    else:
        graph.erase_node(node)
    kernel = _kernel_name(kind, device, geo)
    if bhq:
        kernel += ", then T^-1 on the output samples"
    return True, f"transposed: {kernel}" if transposed else kernel
