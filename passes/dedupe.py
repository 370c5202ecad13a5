"""Mutation pass: share one quantized copy of a tensor used by several GEMMs.

Two deterministic ``fqt::quantize`` nodes of the same tensor with the same spec and layout (the
q/k/v projections of one normalized activation, say) compute the same codes: the later one and
its dequantization are replaced by the earlier ones. "The same tensor" looks through view ops,
because each Linear on a 3-D input reshapes it with a view of its own. Stochastic
quantizations are never merged: each draw must stay independent (Theorem 1 needs it,
biprecision relies on it).
"""

from __future__ import annotations

from dataclasses import replace

from torch import fx

from fqt_compiler.ops import bhq_quantize_op, fake_quantize_op, quantize_op, quantize_stochastic_op
from fqt_compiler.sites import QuantNodeInfo, QuantNodeKind

from fqt_compiler.passes import matchers as m
from fqt_compiler.passes.base import FQTPass, PassContext

_NEVER_MERGED = (quantize_stochastic_op, fake_quantize_op, bhq_quantize_op)


def _value_key(arg: object) -> object:
    """A hashable identity of a value: view nodes are keyed by what they view and how."""
    if isinstance(arg, fx.Node):
        if arg.op == "call_function" and arg.target in m.VIEW_OPS:
            return ("view", arg.target, _value_key(arg.args[0]), _value_key(arg.args[1:]), _value_key(tuple(arg.kwargs.items())))
        return arg
    if isinstance(arg, (list, tuple)):
        return tuple(_value_key(a) for a in arg)
    return arg


class Dedupe(FQTPass):
    name = "dedupe"
    requires = ("insert_qdq",)
    mutates = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        seen: dict[tuple, fx.Node] = {}
        merged = 0
        # One forward sweep is enough: nodes are visited in topological order, so once a
        # quantize node is merged, its getitems and dequant ops key equal to the survivor's.
        for node in list(gm.graph.nodes):
            info = node.meta.get("fqt")
            if not isinstance(info, QuantNodeInfo) or info.what is QuantNodeKind.REPLAY or node.target in _NEVER_MERGED:
                continue  # replays are free views; keeping them per GEMM keeps graphs readable
            try:
                key = (node.target, _value_key(node.args), _value_key(tuple(sorted(node.kwargs.items()))))
                hash(key)
            except TypeError:
                continue
            survivor = seen.get(key)
            if survivor is None:
                seen[key] = node
                continue
            s_info = survivor.meta["fqt"]
            survivor.meta["fqt"] = replace(s_info, shared_with=s_info.shared_with | {info.site_id} | info.shared_with)
            node.replace_all_uses_with(survivor)
            gm.graph.erase_node(node)
            merged += node.target is quantize_op
        ctx.counters["dedupe.merged"] = merged
        gm.graph.eliminate_dead_code()
        gm.recompile()
