"""Invariant checker, run after every pass in debug mode and once at the end of the pipeline.

Invariants:
1. the graph lints, and every call_function node has ``meta["val"]``;
2. every GEMM argument marked quantized in ``GemmNodeInfo`` is produced by an fqt node
   (quantize/dequantize/fake_quantize/replay) of the same site;
3. no stochastic ``fqt::fake_quantize`` node feeds two GEMMs: each backward GEMM draws its own
   quantization of grad_output (biprecision).
The first violation raises PassError naming the node.
"""

from __future__ import annotations

import operator

from torch import fx

from fqt_compiler.errors import PassError
from fqt_compiler.ops import bhq_quantize_op, fake_quantize_op, quantize_stochastic_op
from fqt_compiler.sites import GemmNodeInfo, QuantNodeInfo
from fqt_compiler.specs import QuantSpec

from fqt_compiler.passes import matchers as m


def _gemms_fed_by(node: fx.Node) -> list[fx.Node]:
    """GEMMs reached from ``node`` through getitems and the fqt dequant / replay nodes."""
    found: list[fx.Node] = []
    stack, seen = [node], {node}
    while stack:
        for user in stack.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if m.is_matmul(user) or m.is_conv(user) or user.target is m.CONV_BACKWARD:
                found.append(user)
            elif user.target is operator.getitem or isinstance(user.meta.get("fqt"), QuantNodeInfo):
                stack.append(user)
    return found


def _returns_a_value(node: fx.Node) -> bool:
    """Whether ``node`` should carry a value: not an operator whose schema returns nothing
    (``aten._assert_async``, ``aten._assert_scalar`` -- a model's runtime checks -- which
    AOTAutograd leaves in the graph without one)."""
    schema = getattr(node.target, "_schema", None)
    return schema is None or len(schema.returns) > 0


def verify_graph(gm: fx.GraphModule, after: str) -> None:
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises a bare RuntimeError; give it context
        raise PassError(f"graph fails lint after pass {after!r}: {exc}") from exc
    for node in gm.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta and _returns_a_value(node):
            raise PassError(f"after pass {after!r}: node {node.name} ({node.target}) has no meta['val']")
        info = node.meta.get("fqt")
        if isinstance(info, GemmNodeInfo):
            for idx in info.quantized_args:
                arg = node.args[idx]
                a_info = arg.meta.get("fqt") if isinstance(arg, fx.Node) else None
                if not (isinstance(a_info, QuantNodeInfo) and a_info.serves(info.site_id)):
                    raise PassError(
                        f"after pass {after!r}: GEMM {node.name} ({info.gemm.value}, site {info.site_id}) expects "
                        f"argument {idx} quantized but it comes from {getattr(arg, 'name', arg)!r}"
                    )
        if node.op == "call_function" and node.target in (fake_quantize_op, quantize_stochastic_op, bhq_quantize_op):
            spec = QuantSpec.from_key(node.args[1])
            gemm_users = _gemms_fed_by(node)
            if spec.is_stochastic and len(gemm_users) > 1:
                raise PassError(
                    f"after pass {after!r}: stochastic quantization {node.name} feeds {len(gemm_users)} GEMMs "
                    f"({', '.join(u.name for u in gemm_users)}); each GEMM needs an independent draw"
                )
