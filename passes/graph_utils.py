"""FX helpers every pass shares: the view-op vocabulary, static-tensor checks, and node
creation and rewiring with the metadata the partitioner and later passes need."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_map

from fqt_compiler.errors import PassError

aten = torch.ops.aten

# One view-op vocabulary for the passes and the lowering alike. TRANSPOSES only swap axes;
# RESHAPES only regroup them (``reshape`` copies when it cannot view, with the same values);
# PURE_VIEWS adds broadcasting; VIEW_OPS adds the ops that copy memory unchanged, which is what
# connects a backward GEMM's operand to the forward operand it was derived from.
TRANSPOSES = frozenset({aten.t.default, aten.transpose.int, aten.permute.default})
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
PURE_VIEWS = TRANSPOSES | RESHAPES | {aten.expand.default}
VIEW_OPS = PURE_VIEWS | {aten.alias.default, aten.clone.default}

# metadata copied from the node a new node stands in for: the partitioner reads
# partitioner_tag / seq_nr to place nodes; reports read nn_module_stack
_COPIED_META = ("seq_nr", "partitioner_tag", "autograd_backward", "nn_module_stack", "stack_trace")


def _fake_mode(vals: list[Any]):
    for v in vals:
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def fake_eval(target: Any, args: tuple, kwargs: dict, fake_mode: Any = None) -> Any:
    """Run ``target`` on the ``meta['val']`` of its node arguments (fake tensors).

    ``fake_mode`` is used when no argument carries one (factory ops such as ``aten.full``)."""
    vals: list[Any] = []

    def to_val(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if "val" not in a.meta:
                raise PassError(f"node {a.name} has no meta['val']; fqt passes need a traced joint graph with fake values")
            vals.append(a.meta["val"])
            return a.meta["val"]
        return a

    fargs = tree_map(to_val, args)
    fkwargs = tree_map(to_val, kwargs)
    if target is operator.getitem:
        return fargs[0][fargs[1]]
    mode = _fake_mode(vals) or fake_mode
    if mode is None and any(isinstance(v, torch.SymInt) for v in vals) and not any(isinstance(v, torch.Tensor) for v in vals):
        return target(*fargs, **fkwargs)  # arithmetic on symbolic sizes: SymInts compute their own value
    if mode is None:
        raise PassError(f"no fake mode found on the inputs of {target}")
    with mode:
        return target(*fargs, **fkwargs)


def call(
    graph: fx.Graph,
    target: Any,
    args: tuple,
    kwargs: dict | None = None,
    *,
    like: fx.Node | None = None,
    info: Any = None,
    tag: str | None = None,
    fake_mode: Any = None,
    val: Any = None,
) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's current insertion point. Its fake value
    is ``val`` where the caller has it, else computed from the arguments' (fake tensors)."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    node.meta["val"] = val if val is not None else fake_eval(target, args, kwargs, fake_mode)
    if like is not None:
        for key in _COPIED_META:
            if key in like.meta:
                node.meta[key] = like.meta[key]
    if tag is not None:
        node.meta["partitioner_tag"] = tag
    if info is not None:
        node.meta["fqt"] = info
    return node


def tuple_items(graph: fx.Graph, node: fx.Node, n: int, **kw: Any) -> list[fx.Node]:
    return [call(graph, operator.getitem, (node, i), **kw) for i in range(n)]


def dtype_of(node: fx.Node) -> torch.dtype:
    return node.meta["val"].dtype


def is_static_value(val: object) -> bool:
    """Whether ``val`` (a node's ``meta['val']``) has no symbolic size or stride: non-tensors are."""
    if not isinstance(val, torch.Tensor):
        return True
    return all(isinstance(d, int) for d in (*val.shape, *val.stride()))


def static_tensor(node: object) -> torch.Tensor | None:
    """The fake tensor of ``node`` when it has static sizes and strides, else None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) and is_static_value(val) else None


def rewire(gm: fx.GraphModule, old: fx.Node, new: fx.Node, fake_mode: Any, keep_meta: tuple[str, ...] = ()) -> None:
    """Point every ``getitem(old, i)`` at ``getitem(new, i)`` and drop ``old``; the meta keys in
    ``keep_meta`` move from each old getitem to its replacement."""
    for user in list(old.users):
        if user.target is not operator.getitem:
            raise PassError(f"{old.name} has a non-getitem user {user.name}; only tuple outputs can be rewired")
        with gm.graph.inserting_before(user):
            repl = call(gm.graph, operator.getitem, (new, user.args[1]), like=user, fake_mode=fake_mode)
        for key in keep_meta:
            if key in user.meta:
                repl.meta[key] = user.meta[key]
        user.replace_all_uses_with(repl)
        gm.graph.erase_node(user)
    gm.graph.erase_node(old)


def arg(node: fx.Node, name: str) -> Any:
    """The argument ``name`` of an op call, positional or keyword, by the op's schema (so a
    reader names what it reads instead of counting positions)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        raise PassError(f"{node.name} calls {node.target}, which has no schema to read argument {name!r} from")
    for i, argument in enumerate(schema.arguments):
        if argument.name != name:
            continue
        if i < len(node.args):
            return node.args[i]
        if name in node.kwargs:
            return node.kwargs[name]
        if argument.has_default_value():
            return argument.default_value
        raise PassError(f"{node.name}: argument {name!r} of {schema.name} is missing")
    raise PassError(f"{schema.name} has no argument {name!r}")


def arg_index(target: Any, name: str) -> int:
    """The position of argument ``name`` in ``target``'s schema (to rebuild a call's args)."""
    for i, argument in enumerate(target._schema.arguments):
        if argument.name == name:
            return i
    raise PassError(f"{target._schema.name} has no argument {name!r}")


def replay_view(graph: fx.Graph, view: fx.Node, x: Any, *, like: fx.Node | None = None, info: Any = None) -> fx.Node:
    """``view``'s op (same arguments after its input) applied to ``x`` at the insertion point."""
    return call(graph, view.target, (x, *view.args[1:]), dict(view.kwargs), like=like if like is not None else view, info=info)


def replay_views(graph: fx.Graph, views: list[fx.Node], x: Any, *, like: fx.Node | None = None, info: Any = None) -> Any:
    """The chain ``views`` (first applied first) replayed on ``x``."""
    for view in views:
        x = replay_view(graph, view, x, like=like, info=info)
    return x
