"""Symbolic sizes as graph nodes.

An op that is told its result's shape (``fqt::qconv``'s ``out_shape``) needs, in a graph traced
with symbolic sizes (``dynamic=True``, or Dynamo's automatic dynamic shapes after a second image
size), the nodes that compute each symbolic size at run time. :func:`size_args` writes them:
each size's expression over the graph's symbols, as Python arithmetic on ``SymInt`` nodes, with
every symbol read off a graph input that holds it (a ``SymInt`` input, or a dim of an input
tensor). Inductor compiles such nodes to host arithmetic on the sizes it already has.
"""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
from torch import fx
from torch.utils._sympy import functions as symfn

from fqt_compiler.passes.graph_utils import call

aten = torch.ops.aten

__all__ = ["size_args"]


def _symbol_sources(graph: fx.Graph) -> dict[sympy.Symbol, tuple[fx.Node, int | None]]:
    """Every symbol that is a graph input's value or one of its sizes: (input, dim or None)."""
    sources: dict[sympy.Symbol, tuple[fx.Node, int | None]] = {}
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
            sources.setdefault(val.node.expr, (node, None))
        elif isinstance(val, torch.Tensor):
            for dim, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    sources.setdefault(size.node.expr, (node, dim))
    return sources


# sympy functions of integer size expressions, and the Python operation each one is (FloorDiv
# covers its exact-division subclass CleanDiv); a sympy Pow only with a natural exponent
_BINARY = ((symfn.FloorDiv, operator.floordiv), (symfn.PythonMod, operator.mod), (symfn.Mod, operator.mod),
           (symfn.PowByNatural, operator.pow))
_FOLDS = {sympy.Add: operator.add, sympy.Mul: operator.mul, symfn.Max: torch.sym_max, symfn.Min: torch.sym_min}


def _binary(expr: sympy.Expr) -> Any:
    for cls, target in _BINARY:
        if isinstance(expr, cls):
            return target
    if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp >= 0:
        return operator.pow
    return None


class _Emitter:
    """Writes one expression's nodes at the graph's insertion point; sub-expressions once each."""

    def __init__(self, graph: fx.Graph, like: fx.Node | None):
        self.graph, self.like = graph, like
        self.sources = _symbol_sources(graph)
        self.done: dict[sympy.Expr, Any] = {}

    def _node(self, target: Any, args: tuple) -> fx.Node:
        return call(self.graph, target, args, like=self.like)

    def emit(self, expr: sympy.Expr) -> Any:
        """An int or a node whose value is ``expr``; raises ``LookupError`` naming what has no
        source or no Python equivalent."""
        if expr in self.done:
            return self.done[expr]
        if isinstance(expr, sympy.Integer):
            out: Any = int(expr)
        elif isinstance(expr, sympy.Symbol):
            if expr not in self.sources:
                raise LookupError(f"the size symbol {expr} is no graph input's size")
            node, dim = self.sources[expr]
            out = node if dim is None else self._node(aten.sym_size.int, (node, dim))
        elif type(expr) in _FOLDS:
            target = _FOLDS[type(expr)]
            terms = [self.emit(a) for a in expr.args]
            out = terms[0]
            for t in terms[1:]:
                out = self._node(target, (out, t))
        elif (binary := _binary(expr)) is not None:
            out = self._node(binary, tuple(self.emit(a) for a in expr.args))
        elif isinstance(expr, symfn.CeilDiv):  # ceil(a / b) = -((-a) // b)
            a, b = (self.emit(x) for x in expr.args)
            out = self._node(operator.neg, (self._node(operator.floordiv, (self._node(operator.neg, (a,)), b)),))
        else:
            raise LookupError(f"the size expression {expr} ({type(expr).__name__}) has no graph equivalent here")
        self.done[expr] = out
        return out


def size_args(graph: fx.Graph, sizes: tuple, like: fx.Node | None = None) -> list | str:
    """``sizes`` as an op argument: each int as is, each symbolic size as the nodes (inserted at
    the graph's insertion point) that compute it from the graph's inputs. A reason string where
    some size cannot be written so (a symbol no input holds: an unbacked size from a
    data-dependent op, say)."""
    emitter = _Emitter(graph, like)
    out = []
    for size in sizes:
        if isinstance(size, int):
            out.append(size)
            continue
        try:
            out.append(emitter.emit(size.node.expr))
        except LookupError as e:
            return str(e)
    return out
