"""Kernel selection: the quantizer ops of a lowered graph pointed at their Triton twins.

The twins (declared in ``fqt_compiler/ops.py``) take the same arguments and give the same
results given the same seed.
"""

from __future__ import annotations

import torch
from torch import fx

from fqt_compiler.ops import bhq_inverse_kernel_op, bhq_quantize_kernel_op, fake_quantize_kernel_op, quantize_kernel_op

__all__ = ["KERNEL_TWINS", "swap_to_kernel_ops"]

# reference op -> its kernel twin (same arguments, same results given the same seed)
KERNEL_TWINS = {
    torch.ops.fqt.quantize.default: quantize_kernel_op,
    torch.ops.fqt.quantize_stochastic.default: quantize_kernel_op,
    torch.ops.fqt.bhq_quantize.default: bhq_quantize_kernel_op,
    torch.ops.fqt.bhq_inverse.default: bhq_inverse_kernel_op,
    torch.ops.fqt.fake_quantize.default: fake_quantize_kernel_op,
}


def swap_to_kernel_ops(gm: fx.GraphModule, include_cpu: bool = False) -> int:
    """Point quantize / BHQ nodes on CUDA (and on CPU with ``include_cpu``) at their Triton twins."""
    count = 0
    for node in gm.graph.nodes:
        twin = KERNEL_TWINS.get(node.target) if node.op == "call_function" else None
        val = node.args[0].meta.get("val") if twin is not None else None
        if twin is not None and isinstance(val, torch.Tensor) and (val.device.type == "cuda" or include_cpu):
            node.target = twin
            count += 1
    gm.recompile()
    return count
