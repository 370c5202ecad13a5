"""Mutation pass: share one quantized copy of a tensor used by several GEMMs.

Two deterministic ``fqt::quantize`` nodes with the same input, spec and layout (q/k/v
projections of one normalized activation, say) compute the same codes: the later one and its
dequantization are replaced by the earlier ones. Stochastic quantizations are never merged: each draw must stay independent (Theorem 1 needs it, biprecision relies on it).
"""

from __future__ import annotations

from torch import fx

from fqt_compiler.ops import quantize_op
from fqt_compiler.sites import QuantNodeInfo

from .base import FQTPass, PassContext


def _key(node: fx.Node) -> tuple:
    return (node.target, node.args, tuple(sorted(node.kwargs.items())))


class Dedupe(FQTPass):
    name = "dedupe"
    requires = ("insert_qdq",)
    mutates = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        seen: dict[tuple, fx.Node] = {}
        merged = 0
        # One forward sweep is enough: nodes are visited in topological order, so once a
        # quantize node is merged, its getitems and dequant ops hash equal to the survivor's.
        for node in list(gm.graph.nodes):
            info = node.meta.get("fqt")
            if not isinstance(info, QuantNodeInfo):
                continue
            if info.what == "quantize" and node.target is not quantize_op:
                continue  # stochastic or opaque quantizations: every draw stays independent
            if info.what == "replay":
                continue  # views are free; keeping them per GEMM keeps the graph readable
            try:
                key = _key(node)
                hash(key)
            except TypeError:
                continue
            if key in seen:
                node.replace_all_uses_with(seen[key])
                gm.graph.erase_node(node)
                merged += 1
            else:
                seen[key] = node
        ctx.counters["dedupe.merged"] = merged
        gm.recompile()
