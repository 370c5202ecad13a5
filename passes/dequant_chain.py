"""Both ends of the dequantization contract: the aten chain the rewrite emits after every
quantizer (:func:`emit_quantize`, used by ``insert_qdq``) and its matcher (:func:`match_operand`,
used by codegen's lowering to find the codes and statistics behind a GEMM operand).

The chain is ``convert(codes) [- zero_point] * scale [+ offset] [bhq_inverse] [convert]``: the
op sequence of ``grid.dequantize_ref``, so graph and reference agree bit for bit. Kept in one
module so that a change to one end cannot miss the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fqt_compiler.layout import Layout, placement
from fqt_compiler.ops import (
    bhq_inverse_op,
    bhq_quantize_op,
    fake_quantize_op,
    needs_fake_quantize,
    quantize_op,
    quantize_stochastic_op,
)
from fqt_compiler.sites import QuantNodeInfo, QuantNodeKind
from fqt_compiler.specs import QuantSpec, Scheme, Transform
from fqt_compiler.passes.graph_utils import RESHAPES, TRANSPOSES, call, dtype_of, tuple_items

__all__ = ["CONVERT", "DequantOperand", "emit_quantize", "match_operand", "is_dequantization"]

aten = torch.ops.aten
# casts are prims.convert_element_type, the form Inductor's decompositions produce and its
# lowerings expect (aten._to_copy would be a second, conflicting path to the same op)
CONVERT = torch.ops.prims.convert_element_type.default


def emit_quantize(
    graph: fx.Graph, x: fx.Node, spec: QuantSpec, layout: Layout, info: QuantNodeInfo, like: fx.Node, tag: str | None
) -> fx.Node:
    """Insert quantize-dequantize of ``x`` at the insertion point; return the dequantized node."""
    val = x.meta.get("val")
    spec, layout = placement(spec, layout, val.dim() if isinstance(val, torch.Tensor) else 0)
    key = spec.key()
    kw = dict(like=like, tag=tag)
    if needs_fake_quantize(spec):
        return call(graph, fake_quantize_op, (x, key, int(layout)), info=info, **kw)
    bhq = spec.transform is Transform.BLOCK_HOUSEHOLDER
    op = bhq_quantize_op if bhq else quantize_stochastic_op if spec.is_stochastic else quantize_op
    q = call(graph, op, (x, key, int(layout)), info=info, **kw)
    codes, scale, zp, offset, *transform = tuple_items(graph, q, 7 if bhq else 4, info=info, **kw)
    dq_info = QuantNodeInfo(info.site_id, info.gemm, info.role, key, QuantNodeKind.DEQUANTIZE)
    out = call(graph, CONVERT, (codes, dtype_of(scale)), info=dq_info, **kw)
    # the same op sequence as grid.dequantize_ref, so graph and reference agree bit for bit
    if spec.scheme is not Scheme.SYMMETRIC:
        out = call(graph, aten.sub.Tensor, (out, zp), info=dq_info, **kw)
    out = call(graph, aten.mul.Tensor, (out, scale), info=dq_info, **kw)
    if spec.scheme is Scheme.ASYMMETRIC:
        out = call(graph, aten.add.Tensor, (out, offset), info=dq_info, **kw)
    if bhq:
        t_info = QuantNodeInfo(info.site_id, info.gemm, info.role, key, QuantNodeKind.TRANSFORM)
        out = call(graph, bhq_inverse_op, (out, *transform, int(layout)), info=t_info, **kw)
    if dtype_of(out) != dtype_of(x):
        out = call(graph, CONVERT, (out, dtype_of(x)), info=dq_info, **kw)
    return out


@dataclass
class DequantOperand:
    """A GEMM operand that is a dequantization: its codes, statistics and spec, and the views
    between the dequantized value and the GEMM argument."""

    codes: fx.Node
    scale: fx.Node
    zp: fx.Node | None
    offset: fx.Node | None
    spec: QuantSpec
    views: list[fx.Node]  # from the dequantized value (exclusive) to the GEMM argument
    transform: fx.Node | None = None  # the fqt::bhq_inverse applied after the dequantization


def match_operand(arg: fx.Node) -> DequantOperand | str:
    """Walk from a GEMM argument back to its dequantization; return it or the reason not."""
    views: list[fx.Node] = []
    cur = arg
    while isinstance(cur, fx.Node) and cur.op == "call_function" and (cur.target in TRANSPOSES or cur.target in RESHAPES):
        info = cur.meta.get("fqt")
        if isinstance(info, QuantNodeInfo) and info.what is QuantNodeKind.DEQUANTIZE:
            break
        views.append(cur)
        cur = cur.args[0]
    info = cur.meta.get("fqt") if isinstance(cur, fx.Node) else None
    if not isinstance(info, QuantNodeInfo):
        return "operand kept in high precision"
    if cur.target is fake_quantize_op:
        return f"{info.role.value} quantized with {QuantSpec.from_key(info.spec_key).short()}: no codes-and-scales form"
    if not _in_chain(cur):
        return f"operand comes from an fqt {info.what} node, not a dequantization"
    scale = zp = offset = transform = None
    node = cur
    # the chain emit_quantize writes, walked backwards
    if node.target is CONVERT and isinstance(node.args[0], fx.Node) and _in_chain(node.args[0]):
        node = node.args[0]  # the final cast back to the operand's dtype (after BHQ's inverse, if any)
    if node.target is bhq_inverse_op:
        transform, node = node, node.args[0]
    if node.target is aten.add.Tensor:
        offset, node = node.args[1], node.args[0]
    if node.target is not aten.mul.Tensor:
        return "unrecognised dequantization chain"
    scale, node = node.args[1], node.args[0]
    if node.target is aten.sub.Tensor:
        zp, node = node.args[1], node.args[0]
    if node.target is not CONVERT:
        return "unrecognised dequantization chain"
    spec = QuantSpec.from_key(info.spec_key)
    return DequantOperand(node.args[0], scale, zp, offset, spec, list(reversed(views)), transform)


def _in_chain(node: fx.Node) -> bool:
    """Whether ``node`` is a dequantization op or BHQ's inverse transform (the ops a final cast
    back to the operand's dtype may follow)."""
    info = node.meta.get("fqt")
    return isinstance(info, QuantNodeInfo) and info.what in (QuantNodeKind.DEQUANTIZE, QuantNodeKind.TRANSFORM)


def is_dequantization(node: fx.Node) -> bool:
    """Whether ``node`` is one of the ops of a dequantization chain."""
    info = node.meta.get("fqt")
    return isinstance(info, QuantNodeInfo) and info.what is QuantNodeKind.DEQUANTIZE
