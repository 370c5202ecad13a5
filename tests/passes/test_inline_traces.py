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


def _viewing_body(x, scale):
    """Views of the input and of a fresh result, and a reduction."""
    y = (x.t() * scale).reshape(-1)
    return y.view(x.shape[1], x.shape[0]).transpose(0, 1) + x.amax(1, keepdim=True).expand(x.shape)


def test_spliced_values_equal_the_ops_run_again_aliasing_included():
    """Spliced nodes take their fake values from the trace (running every op again was half of
    a small model's compile time): sizes, strides and dtypes equal those of the op run on the
    graph's own values, views share their input's storage, and every value belongs to the
    graph's fake mode."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from fqt_compiler.passes.graph_utils import fake_eval

    gm = _graph([(4, 8), (3, 5)], 0.5)
    mode = gm.graph.find_nodes(op="placeholder")[0].meta["val"].fake_mode
    for node in [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor]:
        inline.inline_graph_node(gm, node, _viewing_body, traces={})
    checked = views = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function"]:
        want = fake_eval(node.target, node.args, node.kwargs, mode)
        got = node.meta["val"]
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            if not isinstance(w, torch.Tensor):
                continue
            assert g.fake_mode is mode, node.name
            assert (g.shape, g.stride(), g.dtype) == (w.shape, w.stride(), w.dtype), node.name
            inputs = [a.meta["val"] for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
            aliases = any(StorageWeakRef(w.untyped_storage()) == StorageWeakRef(i.untyped_storage()) for i in inputs)
            assert aliases == any(StorageWeakRef(g.untyped_storage()) == StorageWeakRef(i.untyped_storage())
                                  for i in inputs), node.name
            checked, views = checked + 1, views + aliases
    assert checked > 10 and views > 2


def test_trace_cache_keeps_the_most_recently_used_traces():
    cache = inline.TraceCache(size=2)
    cache["a"], cache["b"] = 1, 2
    assert cache["a"] == 1  # "a" is now the most recent
    cache["c"] = 3
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    cache.clear()
    assert len(cache) == 0


def _dead_views_body(x, scale):
    """Views computed and dropped (as functionalization replays them after a kernel writes its
    buffer), then the result."""
    x.t()
    x.reshape(-1).view(x.shape[1], x.shape[0])
    return x * scale


def test_traces_keep_no_unused_nodes():
    """A trace is pruned of values nothing uses before it is spliced: each spliced node costs
    a fake-tensor evaluation."""
    gm = _graph([(4, 8)], 0.5)
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    sub, _ = inline.trace_node(_dead_views_body, node)
    ops = [n for n in sub.graph.nodes if n.op == "call_function"]
    assert [n.target for n in ops] == [torch.ops.aten.mul.Tensor] and all(n.users for n in ops)


def test_launch_traces_are_dropped_when_torch_renumbers_its_kernels():
    """Launch traces name kernels by their index in torch's kernel side table, shared by every
    graph of the process until ``torch._dynamo.reset()`` replaces the table."""
    from fqt_compiler.codegen.launches import LaunchTraces

    traces = LaunchTraces()
    traces["key"] = "trace"
    assert "key" in traces and traces["key"] == "trace"
    torch._dynamo.reset()
    assert "key" not in traces and len(traces) == 0
    traces["key"] = "again"
    assert "key" in traces
