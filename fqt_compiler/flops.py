"""FLOPs of contractions: which graph nodes do matmul-like work, and how much.

The source of truth is ``torch.utils.flop_counter``'s registry (what ``FlopCounterMode``
counts), so a contraction fqt has no matcher for is still seen, counted and reported, never
silently left in high precision. The registry lacks some contractions (torch 2.13: none for
``_trilinear`` -- ``nn.Bilinear`` --, ``mv``, ``addmv``, ``dot``, ``addbmm``, ``_int_mm`` or the CPU
flash-attention kernels); formulas for them are registered here, once, where torch has none,
so ``FlopCounterMode`` counts them too.

``step_flops`` counts an eager forward + backward: the baseline against which ``explain``
reports the share of a step's GEMM FLOPs that ran quantized.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import (
    FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count,
)

__all__ = ["node_flops", "is_contraction", "step_flops"]

aten = torch.ops.aten


def _register(name: str, formula) -> None:
    packet = getattr(aten, name, None)
    if packet is not None and packet not in flop_registry:  # a newer torch may have its own
        register_flop_formula(packet)(formula)


def _mv(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1]


def _addmv(bias, a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1]


def _dot(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0]


def _addbmm(bias, a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1] * a[2] * b[2]


def _int_mm(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1] * b[1]


def _trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim, *args, out_shape=None, **kwargs) -> int:
    """sum over ``sumdim`` of i1 * i2 * i3, each unsqueezed at its ``expand`` dims: one
    multiply-add per element of their common broadcast shape (the bilinear form's B*O*I1*I2)."""
    shapes = []
    for shape, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        dims = list(shape)
        for d in sorted(expand):
            dims.insert(d, 1)
        shapes.append(dims)
    return 2 * math.prod(max(sizes) for sizes in zip(*shapes))


def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


for _name, _formula in (("mv", _mv), ("addmv", _addmv), ("dot", _dot), ("vdot", _dot), ("addbmm", _addbmm), ("_int_mm", _int_mm),
                        ("_trilinear", _trilinear), ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward)):
    _register(_name, _formula)


def _conv_backward(grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, output_mask,
                   *args, out_shape=None, **kwargs) -> int:
    """convolution_backward as the forward convolution's FLOPs once per gradient computed
    (input, weight). torch's own formula ignores ``groups`` for the weight gradient and counts
    a depthwise convolution's C times over; the weight's shape already holds C / groups."""
    spatial = x[2:] if transposed else grad_out[2:]  # where the forward convolution's windows are
    forward = 2 * grad_out[0] * math.prod(spatial) * math.prod(w)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


# the counts step_flops makes: the registry, with formulas torch gets wrong replaced
STEP_FORMULAS = {aten.convolution_backward: _conv_backward}


def is_contraction(node: fx.Node) -> bool:
    """Whether ``node`` is an op ``FlopCounterMode`` counts: a matmul, convolution, attention..."""
    packet = getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None
    return packet is not None and packet in flop_registry


def _concrete(v: Any) -> Any:
    """A fake tensor's value as it is (the formulas read shapes); symbolic sizes by their hint."""
    if isinstance(v, torch.SymInt):
        return v.node.hint if v.node.has_hint() else 0
    return v


def node_flops(node: fx.Node) -> int:
    """The FLOPs of one traced contraction (0 for other nodes, or sizes with no hint)."""
    if not is_contraction(node):
        return 0
    args, kwargs = tree_map(lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
    try:
        flops = flop_registry[node.target.overloadpacket](*args, **kwargs, out_val=node.meta.get("val"))
        return int(_concrete(flops))
    except Exception:  # a formula that cannot read these (symbolic) shapes: counted as unknown
        return 0


def step_flops(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> int:
    """GEMM-like FLOPs of one eager forward + backward of ``model`` (``sum()`` of its floating
    outputs as the loss), as ``FlopCounterMode`` counts them. Gradients are restored after."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    params += [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
    saved = [p.grad for p in params]
    counter = FlopCounterMode(display=False, custom_mapping=STEP_FORMULAS)
    try:
        with counter, torch.enable_grad():
            out = model(*args, **(kwargs or {}))
            leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            if leaves:
                torch.autograd.backward([t.float().sum() for t in leaves])
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return int(counter.get_total_flops())
