"""Inlining a node by the trace of a function: traces are shared between nodes whose
arguments match, and a shared trace splices exactly what a fresh trace would."""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from fqt_compiler.codegen import inline


def _graph(shapes: list[tuple[int, ...]], scale: float) -> fx.GraphModule:
    """x_i -> torch.mul(x_i, scale) per shape, each node carrying fake values as a compile's do."""
    mode = FakeTensorMode()
    graph = fx.Graph()
    outs = []
    for i, shape in enumerate(shapes):
        x = graph.placeholder(f"x{i}")
        with mode:
            x.meta["val"] = torch.empty(shape)
        node = graph.call_function(torch.ops.aten.mul.Tensor, (x, scale))
        with mode:
            node.meta["val"] = torch.empty(shape)
        outs.append(node)
    graph.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), graph)


def _inline_all(gm: fx.GraphModule, fn, traces: dict | None) -> fx.GraphModule:
    for node in [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor]:
        inline.inline_graph_node(gm, node, fn, traces=traces)
    gm.recompile()
    return gm


def _body(x, scale):
    return torch.tanh(x) * scale + 1


def test_nodes_with_the_same_arguments_share_one_trace_and_splice_the_same_graph(monkeypatch):
    calls = []
    real = inline.trace_node

    def counting(fn, node, functionalize=False):
        calls.append(tuple(node.args[0].meta["val"].shape))
        return real(fn, node, functionalize)

    monkeypatch.setattr(inline, "trace_node", counting)
    shapes = [(4, 8), (4, 8), (2, 3), (4, 8)]
    cached = _inline_all(_graph(shapes, 0.5), _body, traces={})
    assert calls == [(4, 8), (2, 3)]  # one trace per distinct argument signature
    calls.clear()
    fresh = _inline_all(_graph(shapes, 0.5), _body, traces=None)
    assert len(calls) == len(shapes)
    assert [str(n.target) for n in cached.graph.nodes] == [str(n.target) for n in fresh.graph.nodes]
    xs = [torch.randn(s) for s in shapes]
    for got, want in zip(cached(*xs), fresh(*xs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, x in zip(cached(*xs), xs):
        torch.testing.assert_close(got, _body(x, 0.5), rtol=0, atol=0)


def test_a_different_constant_argument_is_traced_again(monkeypatch):
    calls = []
    real = inline.trace_node
    monkeypatch.setattr(inline, "trace_node", lambda fn, node, f=False: (calls.append(node.args[1]), real(fn, node, f))[1])
    traces: dict = {}
    _inline_all(_graph([(4, 8)], 0.5), _body, traces)
    out = _inline_all(_graph([(4, 8)], 2.0), _body, traces)
    assert calls == [0.5, 2.0]
    x = torch.randn(4, 8)
    torch.testing.assert_close(out(x)[0], _body(x, 2.0), rtol=0, atol=0)
