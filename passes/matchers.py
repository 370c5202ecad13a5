"""Small predicates over FX nodes: which ops are GEMMs, which are view-like, how to walk chains."""

from __future__ import annotations

import re

import torch
from torch import fx

from fqt_compiler.layout import Layout
from fqt_compiler.passes.graph_utils import VIEW_OPS

aten = torch.ops.aten

# forward GEMM op -> positional indices of its (lhs, rhs) operands
MATMUL_OPERANDS = {
    aten.mm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
}
# the batched ones: a GEMM per entry of a (B, M, K) @ (B, K, N) batch
BATCHED_MATMULS = frozenset({aten.bmm.default, aten.baddbmm.default})
CONV_OPS = {aten.convolution.default}
CONV_BACKWARD = aten.convolution_backward.default

# GEMM-like nodes the pass sees but cannot quantize; each maps to the reason stated in reports.
_ATTENTION_REASON = "fused attention kernel: its GEMMs run inside one opaque op"
UNSUPPORTED_GEMMS: dict[object, str] = {}


def _register_unsupported(names: list[str], reason: str) -> None:
    for name in names:
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            UNSUPPORTED_GEMMS[getattr(packet, overload)] = reason


_register_unsupported(
    [
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward",
        "_efficient_attention_forward",
        "scaled_dot_product_attention",
        # and their backward kernels
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention_backward",
        "_scaled_dot_product_fused_attention_overrideable_backward",
        "_flash_attention_backward",
        "_efficient_attention_backward",
    ],
    _ATTENTION_REASON,
)
_register_unsupported(
    ["mv", "addmv", "dot", "vdot", "addr", "outer"], "matrix-vector/outer product: memory bound, not a GEMM worth quantizing"
)
# nn.TransformerEncoderLayer's and nn.MultiheadAttention's inference fast path (eval mode, no
# grad): the whole layer's projections and feed-forward GEMMs inside one op
_FASTPATH_REASON = ("PyTorch's fused inference fast path (nn.TransformerEncoderLayer / nn.MultiheadAttention in eval "
                    "mode without grad): its GEMMs run inside one opaque op, in high precision; call "
                    "torch.backends.mha.set_fastpath_enabled(False) before compiling to quantize them")
_register_unsupported(["_transformer_encoder_layer_fwd", "_native_multi_head_attention"], _FASTPATH_REASON)
_register_unsupported(["addbmm"], "addbmm (batch-reduced GEMM) is not supported yet")
_register_unsupported(["_int_mm", "_scaled_mm", "_weight_int8pack_mm", "_weight_int4pack_mm"], "already a low-bit GEMM")


# Ops whose decompositions must not run before the pass: Inductor's table rewrites a GEMM with a
# dim of 1 (a one-row batch, a one-feature Linear) into multiplies and sums on some devices and
# sizes, and the site would vanish from the graph unquantized and unrecorded. The attention ops
# and the inference fast path keep theirs (their GEMMs are opaque either way).
GEMM_PACKETS = frozenset(
    op.overloadpacket
    for op in (*MATMUL_OPERANDS, *CONV_OPS, CONV_BACKWARD,
               *(op for op, reason in UNSUPPORTED_GEMMS.items() if reason not in (_ATTENTION_REASON, _FASTPATH_REASON)))
)

def is_matmul(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in MATMUL_OPERANDS


def is_conv(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CONV_OPS


def is_backward_node(node: fx.Node) -> bool:
    return node.meta.get("partitioner_tag") == "is_backward" or bool(node.meta.get("autograd_backward"))


def op_name(node: fx.Node) -> str:
    return f"aten.{node.target.__name__.split('.')[0]}" if hasattr(node.target, "__name__") else str(node.target)


def val_shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _swaps_last_two(node: fx.Node) -> bool | None:
    """True if a view-like node swaps the last two dims, False if it keeps them, None if unknown."""
    src, out = val_shape(node.args[0]), val_shape(node)
    if src is None or out is None:
        return None
    t = node.target
    if t is aten.t.default:
        return len(src) == 2
    if t is aten.transpose.int:
        nd = len(src)
        dims = sorted(d % nd for d in node.args[1:3])
        if dims == [nd - 2, nd - 1]:
            return True
        return False if nd - 1 not in dims and nd - 2 not in dims else None
    if t is aten.permute.default:
        perm = [d % len(src) for d in node.args[1]]
        nd = len(perm)
        if perm[: nd - 2] != list(range(nd - 2)):
            return None
        return perm[nd - 2 :] == [nd - 1, nd - 2]
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
        if len(src) >= 2 and len(out) >= 2 and src[-2:] == out[-2:]:
            return False  # only batch dims change
        return None
    return False  # alias / clone


def trace_to(node: fx.Node, targets: set[fx.Node], max_depth: int = 16) -> tuple[fx.Node, list[fx.Node], int] | None:
    """Walk view-like producers from ``node`` back to one of ``targets``.

    Returns (target reached, chain of view nodes from target (exclusive) to ``node``
    (inclusive), number of last-two-dim swaps along it), or None when the walk leaves the view
    ops or meets a view whose effect on the matrix layout is not a plain transpose.
    """
    chain: list[fx.Node] = []
    swaps = 0
    cur = node
    for _ in range(max_depth):
        if cur in targets:
            return cur, list(reversed(chain)), swaps
        if not (isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in VIEW_OPS):
            return None
        swap = _swaps_last_two(cur)
        if swap is None:
            return None
        swaps += int(swap)
        chain.append(cur)
        cur = cur.args[0]
    return None


def flip(layout: Layout, swaps: int) -> Layout:
    if layout is Layout.DIM0 or swaps % 2 == 0:
        return layout
    return Layout.LAST if layout is Layout.PENULTIMATE else Layout.PENULTIMATE


_L_PREFIX = re.compile(r"^L\['[^']*'\]\.?")


def module_path(node: fx.Node) -> str:
    """Dotted module path of the module that produced ``node`` (``-`` outside any module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "-"
    fqn = list(stack.values())[-1][0]
    fqn = _L_PREFIX.sub("", str(fqn))
    fqn = re.sub(r"\[(\d+)\]", r".\1", fqn)
    fqn = re.sub(r"\['([^']*)'\]", r".\1", fqn)
    fqn = re.sub(r"^_modules\.|\._modules\.", ".", fqn).strip(".")
    # a compiled bound method (``module.forward``): paths are relative to that module
    fqn = re.sub(r"^__self__(\.|$)", "", fqn)
    return fqn or "<root>"
