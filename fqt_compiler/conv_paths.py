"""The device paths of the convolution ops ``fqt::qconv`` and ``fqt::conv_codes`` (declared, with
their fakes, in ``ops.py``).

On the CPU a convolution GEMM is :func:`conv_codes` -- the int8 sums ``f(a - a_zero, b)`` on
oneDNN's int8 convolution or ``torch._int_mm`` (``codegen/kernels/conv_cpu.py``), an opaque op
-- followed by the shared epilogue of ``conv.dequantize_conv_accumulator`` in torch ops
(:func:`qconv_cpu`). Graphs Inductor compiles for the CPU trace :func:`qconv_cpu` in place of
``fqt::qconv`` (``codegen/inline.py``): Inductor then fuses the dequantization and the
zero-point corrections with the ops around them, where the opaque op ran them eagerly, one pass
over the result each. On CUDA, :func:`qconv_triton` runs the implicit-GEMM kernels.
"""

from __future__ import annotations

import torch

from .conv import ConvGeometry, dequantize_conv_accumulator, foldable_zero_point, qconv_ref
from .grid import QOperand
from .specs import GemmKind

__all__ = ["CONV_KINDS", "cpu_conv_problem", "qconv_cpu", "qconv_cpu_of_op_args", "qconv_triton", "conv_codes",
           "conv_codes_layout"]

# The GEMM a qconv / conv_codes call computes, by its integer ``kind`` argument:
CONV_KINDS = (GemmKind.OUTPUT, GemmKind.GRAD_INPUT, GemmKind.GRAD_WEIGHT)


def _onednn() -> bool:
    return cpu_conv_problem() is None


def cpu_conv_problem() -> str | None:
    """Why convolutions on this CPU have no int8 kernel (None: oneDNN's int8 convolution gives
    exact sums here, directly or with split weights; ``codegen/kernels/conv_cpu.py``)."""
    from fqt_compiler.codegen.kernels.conv_cpu import onednn_problem  # codegen: imported on use

    return onednn_problem()


def qconv_cpu(
    kind: GemmKind, a: QOperand, b: QOperand, geo: ConvGeometry, bias, out_dtype, channels_last: bool = False
) -> torch.Tensor:
    """The CPU path: int8 codes on ``fqt::conv_codes``, the shared epilogue after, in torch ops
    (traceable: sizes and dtypes decide every branch; a per-tensor zero point of ``a`` goes
    into the op, which subtracts it in the integer sums where it can)."""
    empty = a.codes.numel() == 0 or b.codes.numel() == 0  # nothing to convolve (a batch of 0)
    if empty or a.codes.dtype != torch.int8 or b.codes.dtype != torch.int8 or not _onednn():
        return qconv_ref(kind, a, b, geo, bias, out_dtype, channels_last)
    fold = kind is not GemmKind.GRAD_WEIGHT and a.zero_point is not None and a.zero_point.numel() == 1
    acc = torch.ops.fqt.conv_codes.default(
        CONV_KINDS.index(kind), a.codes, b.codes, a.zero_point if fold else None, list(geo.stride), list(geo.padding),
        list(geo.dilation), geo.groups, list(geo.out_shape(kind)))
    return dequantize_conv_accumulator(kind, acc, a, b, geo, bias, out_dtype, channels_last, owned=True, a_zero_folded=fold)


def qconv_cpu_of_op_args(kind, a, sa, za, oa, b, sb, zb, ob, bias, stride, padding, dilation, groups, out_shape, out_dtype,
                         channels_last):
    """:func:`qconv_cpu` on ``fqt::qconv``'s flat arguments."""
    gemm = CONV_KINDS[kind]
    geo = ConvGeometry.of_call(gemm, a.shape, b.shape, out_shape, stride, padding, dilation, groups)
    return qconv_cpu(gemm, QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob), geo, bias, out_dtype, channels_last)


def qconv_triton(kind, a, sa, za, oa, b, sb, zb, ob, bias, stride, padding, dilation, groups, out_shape, out_dtype,
                 channels_last):
    """``fqt::qconv``'s Triton launch on its flat arguments: the codes' sums on the implicit-GEMM
    kernels, the statistics applied by the shared epilogue (torch ops Inductor fuses)."""
    from fqt_compiler.codegen.kernels.conv import conv_codes_triton  # Triton: imported on first launch

    gemm = CONV_KINDS[kind]
    geo = ConvGeometry.of_call(gemm, a.shape, b.shape, out_shape, stride, padding, dilation, groups)
    acc = conv_codes_triton(gemm, a, b, geo)
    qa, qb = QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob)
    return dequantize_conv_accumulator(gemm, acc, qa, qb, geo, bias, out_dtype, channels_last, owned=True)


def conv_codes(kind: int, a, b, a_zero, stride, padding, dilation, groups, out_shape) -> torch.Tensor:
    """``fqt::conv_codes``: ``f(a - a_zero, b)`` of int8 codes (``a_zero``: a per-tensor zero
    point, or None), fp32 for fprop / dgrad and exact int32 for wgrad, laid out as
    :func:`conv_codes_layout` says. oneDNN subtracts a zero point that is an int8 code in its
    int32 sums; any other (NaN among them) is subtracted here, through ``f(1, b)``."""
    from fqt_compiler.codegen.kernels import conv_cpu  # looked up per call: tests observe the kernels

    gemm = CONV_KINDS[kind]
    geo = ConvGeometry.of_call(gemm, a.shape, b.shape, out_shape, stride, padding, dilation, groups)
    zero = foldable_zero_point(a_zero)
    acc = conv_cpu.conv_codes_cpu(gemm, a, b, geo, a_zero=zero or 0)
    if a_zero is not None and zero is None:
        acc = (acc.double() - a_zero.double().reshape(()) * geo.sum_b(gemm, b)).float()
    return conv_cpu.in_order(acc, conv_cpu.acc_order(gemm, len(out_shape)))


def conv_codes_layout(kind: int, out_shape) -> tuple[torch.dtype, tuple[int, ...]]:
    """The dtype and strides of ``fqt::conv_codes``'s result (its fake's and its kernels')."""
    from fqt_compiler.codegen.kernels.conv_cpu import acc_order, order_strides  # codegen: imported on use

    gemm = CONV_KINDS[kind]
    dtype = torch.int32 if gemm is GemmKind.GRAD_WEIGHT else torch.float32
    return dtype, order_strides(out_shape, acc_order(gemm, len(out_shape)))
