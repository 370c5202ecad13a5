"""Epilogue fusion: low-bit GEMMs absorb the pointwise ops that consume their output.

After prologue fusion (quantizers have taken the chains that feed them), every ``fqt::qmm``
whose output is read by exactly one pointwise op (through at most one view) grows a chain of
single-consumer pointwise consumers -- residual adds, activation functions, scalings, casts --
and becomes one ``fqt::qmm_epilogue`` call: the generated kernel (``kernels/qmm_epilogue.py``)
applies the chain to each output tile in registers and stores only its result.

Same scope rule as prologue fusion: CUDA graphs by default (on CPU, Inductor fuses the inlined
GEMM epilogue with its consumers), ``include_cpu=True`` for the interpreter in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from passes.graph_utils import call

from .fusion import _VIEWS, _static_tensor
from .fusion_program import OPS, Program, build_program, dtype_name, run_reference
from .ops import qmm_cpu, qmm_op

__all__ = ["FusedEpilogue", "fuse_epilogues", "qmm_epilogue_op"]


@torch.library.custom_op("fqt::qmm_epilogue", mutates_args=())
def _qmm_epilogue(
    a: torch.Tensor, sa: torch.Tensor, za: torch.Tensor | None, oa: torch.Tensor | None,
    b: torch.Tensor, sb: torch.Tensor, zb: torch.Tensor | None, ob: torch.Tensor | None,
    bias: torch.Tensor | None, out_dtype: torch.dtype, leaves: list[torch.Tensor], program: str,
) -> torch.Tensor:
    prog = Program.loads(program)
    from .ops import _triton_here

    if _triton_here(a):
        from .kernels.qmm_epilogue import qmm_epilogue

        out = qmm_epilogue(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype, list(leaves), prog)
        return out.view(prog.shape)
    # the unfused computation: the GEMM, stored in its dtype, then the consumers op by op
    gemm = qmm_cpu(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype).view(prog.shape)
    return run_reference(prog, [gemm, *leaves]).contiguous()


@_qmm_epilogue.register_fake
def _qmm_epilogue_fake(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype, leaves, program):
    prog = Program.loads(program)
    return a.new_empty(prog.shape, dtype=prog.dtype)


qmm_epilogue_op = torch.ops.fqt.qmm_epilogue.default


@dataclass(frozen=True)
class FusedEpilogue:
    """One GEMM that absorbed its consumers."""

    node: str
    ops: tuple[str, ...]
    program: Program


def _absorbable(user: fx.Node, shape: torch.Size) -> bool:
    if user.op != "call_function" or user.target not in OPS:
        return False
    val = _static_tensor(user)
    if val is None or dtype_name(val.dtype) is None or tuple(val.shape) != tuple(shape):
        return False
    return not (user.kwargs and set(user.kwargs) - {"approximate", "dtype"})


def _leaf_ok(node: fx.Node, shape: torch.Size) -> bool:
    val = _static_tensor(node)
    if val is None or dtype_name(val.dtype) is None:
        return False
    try:
        return tuple(torch.broadcast_shapes(tuple(val.shape), tuple(shape))) == tuple(shape)
    except RuntimeError:
        return False


def fuse_epilogues(gm: fx.GraphModule, include_cpu: bool = False) -> list[FusedEpilogue]:
    """Replace ``qmm -> pointwise consumers`` by generated epilogue-fused GEMMs."""
    fused: list[FusedEpilogue] = []
    for q in list(gm.graph.nodes):
        if q.op != "call_function" or q.target is not qmm_op or len(q.users) != 1:
            continue
        qval = _static_tensor(q)
        if qval is None or (qval.device.type != "cuda" and not include_cpu) or dtype_name(qval.dtype) is None:
            continue
        head = next(iter(q.users))
        if head.target in _VIEWS and len(head.users) == 1:
            start = head  # the GEMM output seen in the consumers' shape (a free view of it)
            head = next(iter(head.users))
        else:
            start = q
        shape = start.meta["val"].shape
        chain: list[fx.Node] = []
        leaves: list[fx.Node] = []
        current, user = start, head
        while _absorbable(user, shape):
            others = [a for a in user.args if isinstance(a, fx.Node) and a is not current]
            if any(a in chain or a is start for a in others) or not all(_leaf_ok(a, shape) for a in others):
                break
            chain.append(user)
            leaves.extend(a for a in others if a not in leaves)
            current = user
            if len(user.users) != 1:
                break  # the root may have several consumers; an interior value only one
            user = next(iter(user.users))
        if not chain:
            continue
        program = build_program(chain, lambda a: ("L", 0) if a is start else ("L", 1 + leaves.index(a)), shape, 1 + len(leaves))
        root = chain[-1]
        with gm.graph.inserting_before(root):
            new = call(gm.graph, qmm_epilogue_op, (*q.args, leaves, program.dumps()), like=root, fake_mode=qval.fake_mode)
        root.replace_all_uses_with(new)
        for n in reversed(chain):
            gm.graph.erase_node(n)
        if start is not q:
            gm.graph.erase_node(start)
        gm.graph.erase_node(q)
        fused.append(FusedEpilogue(q.name, tuple(str(n.target) for n in chain), program))
    gm.graph.lint()
    gm.recompile()
    return fused
