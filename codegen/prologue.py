"""Prologue fusion: quantize nodes absorb the pointwise ops that produce their input.

For every ``fqt::quantize[_stochastic]`` node of a lowered graph, :func:`fuse_prologues` walks
back through the pointwise ops producing its input (bias / residual adds, GELU / SiLU / ReLU,
their backward formulas, casts; through a final view) and cuts out the largest chain whose
interior values nobody else reads. The chain becomes a :class:`~fqt_compiler.fusion_program.Program`
and the quantize node an ``fqt::fused_quantize`` call on the chain's leaves: one generated
Triton kernel computes the chain and writes the codes and scales in a single pass over memory
(``kernels/fused.py``). If other consumers still need the chain's high-precision value, the same
kernel writes it too, and they read that instead.

Numerics: a fused quantizer's codes equal the unfused ones bit for bit when the chain is made
of exactly rounded ops (tested on GPT-2 and LLaMA end to end); erf / exp / tanh may differ in
the last ulp. Stochastic rounding keeps its distribution but not its noise: the fused kernel
draws its seed where it runs (right after the chain), so seeds come in another order.

On CPU the same fusion is Inductor's (``inline.py`` traces the reference quantizer into aten ops
and Inductor fuses producers into it), so by default this pass runs on CUDA graphs only;
``include_cpu=True`` runs the generated kernels on CPU tensors under Triton's interpreter
(tests).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from fqt_compiler.ops import QUANTIZE_OPS
from fqt_compiler.specs import Granularity, QuantSpec, Transform
from fqt_compiler.passes.graph_utils import RESHAPES, call, rewire, static_tensor

from fqt_compiler.fusion_program import OPS, Program, build_program, dtype_name
from fqt_compiler.memory_order import SAVED_LAYOUT, CodeLayout, is_channels_last
from fqt_compiler.ops import fused_quantize_op

__all__ = ["FusedQuantize", "fuse_prologues", "fusable_quantize", "identity_program"]

aten = torch.ops.aten




@dataclass(frozen=True)
class FusedQuantize:
    """One fused quantize node: its program and the graph ops it absorbed."""

    node: str
    spec: str
    ops: tuple[str, ...]
    writes_hp: bool
    program: Program
    stage: str = ""  # "forward" / "backward": node names repeat across the two graphs


def identity_program(shape, dtype: torch.dtype) -> Program:
    """The empty chain over one leaf of ``shape``, rounded to ``dtype``: a fused quantizer of
    the leaf itself, or a GEMM epilogue that only stores the GEMM's output."""
    return Program(tuple(shape), (("convert", (("L", 0),), dtype_name(dtype), "none"),), 1)


def _fusable_spec(spec: QuantSpec) -> bool:
    return spec.transform is Transform.NONE and spec.granularity is not Granularity.BLOCK and spec.quantizer is None


def _collect(root: fx.Node, shape: torch.Size) -> tuple[list[fx.Node], list[object]] | None:
    """The chain of pointwise nodes ending at ``root`` (topological order) and its leaves."""
    chain: list[fx.Node] = []
    members: set[fx.Node] = set()

    def absorbable(n: object) -> bool:
        if not isinstance(n, fx.Node) or n.op != "call_function" or n.target not in OPS:
            return False
        val = static_tensor(n)
        if val is None or dtype_name(val.dtype) is None or tuple(val.shape) != tuple(shape):
            return False
        return not (n.kwargs and set(n.kwargs) - {"approximate", "dtype"})

    def visit(n: fx.Node) -> None:
        members.add(n)
        for a in n.args:
            # an interior value read by anyone outside the chain stays a leaf
            if absorbable(a) and a not in members and all(u in members for u in a.users):
                visit(a)
        chain.append(n)

    if not absorbable(root):
        return None
    visit(root)
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    chain.sort(key=order.__getitem__)
    leaves: list[object] = []
    for n in chain:
        for a in n.args:
            if isinstance(a, fx.Node) and a not in members and a not in leaves:
                val = static_tensor(a)
                if val is None or dtype_name(val.dtype) is None:
                    return None
                try:
                    torch.broadcast_shapes(tuple(val.shape), tuple(shape))
                except RuntimeError:
                    return None
                leaves.append(a)
    return chain, leaves


def fusable_quantize(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in QUANTIZE_OPS:
        return False
    val = static_tensor(node.args[0])
    return _fusable_spec(QuantSpec.from_key(node.args[1])) and val is not None and dtype_name(val.dtype) is not None


def fuse_prologues(gm: fx.GraphModule, include_cpu: bool = False) -> list[FusedQuantize]:
    """Replace quantize nodes (and the pointwise chains feeding them) by fused kernels."""
    fused: list[FusedQuantize] = []
    for q in list(gm.graph.nodes):
        if q.op != "call_function" or q.target not in QUANTIZE_OPS:
            continue
        x, key, layout = q.args
        spec = QuantSpec.from_key(key)
        xval = static_tensor(x)
        if not _fusable_spec(spec) or xval is None or dtype_name(xval.dtype) is None:
            continue
        if xval.device.type != "cuda" and not include_cpu:
            continue
        root = x
        if x.op == "call_function" and x.target in RESHAPES and x.args[0].meta["val"].is_contiguous():
            root = x.args[0]  # a view of a contiguous chain output: same elements, same order
        if not isinstance(root, fx.Node) or static_tensor(root) is None:
            continue
        found = _collect(root, root.meta["val"].shape)
        if found is None or not found[1]:
            continue
        chain, leaves = found
        program = build_program(chain, lambda a: ("L", leaves.index(a)), root.meta["val"].shape, len(leaves))
        # consumers still reading the chain's value: through x, or root directly; another
        # quantizer of the same value fuses the chain itself (recomputing beats a round trip)
        outside_x = [u for u in x.users if u is not q and not fusable_quantize(u)]
        outside_root = [u for u in root.users if u is not x and not fusable_quantize(u)] if root is not x else []
        write_hp = bool(outside_x or outside_root)
        fake_mode = xval.fake_mode
        # a channels-last activation keeps its order: the quantize op's codes have it, and a
        # convolution reading them contiguous would copy them back to channels-last first
        order = CodeLayout.CHANNELS_LAST if is_channels_last(xval) else CodeLayout.NATURAL
        # right after the chain's output: every leaf is defined there, every consumer comes later
        with gm.graph.inserting_after(root):
            new = call(
                gm.graph, fused_quantize_op,
                (leaves, program.dumps(), list(xval.shape), key, layout, write_hp, int(order)),
                like=q, info=q.meta.get("fqt"), fake_mode=fake_mode,
            )
        if write_hp:
            with gm.graph.inserting_after(new):
                hp = call(gm.graph, operator.getitem, (new, 4), like=root, fake_mode=fake_mode)
            for u in outside_x:
                u.replace_input_with(x, hp)
            if outside_root:
                with gm.graph.inserting_after(hp):
                    hp_root = call(
                        gm.graph, aten.view.default, (hp, list(root.meta["val"].shape)), like=root, fake_mode=fake_mode
                    )
                for u in outside_root:
                    u.replace_input_with(root, hp_root)
        rewire(gm, q, new, fake_mode, keep_meta=(SAVED_LAYOUT,))
        fused.append(FusedQuantize(new.name, key, tuple(str(n.target) for n in chain), write_hp, program))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return fused
