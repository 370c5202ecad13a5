"""``fqt::qconv``: one GEMM of a convolution (forward, dgrad or wgrad) on low-bit codes.

The op lowered convolution sites call. Its arguments are the two operands' codes and
statistics (``conv`` module table: ``a`` carries per-row, ``b`` per-column statistics of the
result), the convolution's hyper-parameters and the result's shape; it returns the
dequantized result. On CPU with int8 codes it runs ``codegen.kernels.conv_cpu`` (oneDNN /
``torch._int_mm``); anywhere else the pure-torch reference ``conv.qconv_ref``. The result is
laid out as the convolution it replaces was (``channels_last``), on every path and in the
fake, so the graph's later views and compiled code that reads it by strides see what runs.
"""

from __future__ import annotations

import torch

from .conv import ConvGeometry, dequantize_conv_accumulator, out_memory_format, qconv_ref
from .grid import QOperand
from .specs import GemmKind

__all__ = ["CONV_KINDS", "qconv_op", "geometry_of", "qconv_cpu"]

# the GEMM a qconv call computes, by its integer ``kind`` argument
CONV_KINDS = (GemmKind.OUTPUT, GemmKind.GRAD_INPUT, GemmKind.GRAD_WEIGHT)


def geometry_of(kind: GemmKind, a_shape, b_shape, out_shape, stride, padding, dilation, groups) -> ConvGeometry:
    """The convolution behind one qconv call (its operands' and result's shapes by role)."""
    a, b, out = tuple(a_shape), tuple(b_shape), tuple(out_shape)
    x, w, y = {
        GemmKind.OUTPUT: (a, b, out),
        GemmKind.GRAD_INPUT: (out, b, a),
        GemmKind.GRAD_WEIGHT: (b, out, a),
    }[kind]
    return ConvGeometry(tuple(stride), tuple(padding), tuple(dilation), int(groups), x, w, y)


def qconv_cpu(
    kind: GemmKind, a: QOperand, b: QOperand, geo: ConvGeometry, bias, out_dtype, channels_last: bool = False
) -> torch.Tensor:
    """The CPU path: int8 codes on oneDNN / ``torch._int_mm``, the shared epilogue after."""
    from fqt_compiler.codegen.kernels.conv_cpu import conv_codes_cpu, onednn_available

    empty = a.codes.numel() == 0 or b.codes.numel() == 0  # nothing to convolve (a batch of 0)
    if empty or a.codes.dtype != torch.int8 or b.codes.dtype != torch.int8 or not onednn_available():
        return qconv_ref(kind, a, b, geo, bias, out_dtype, channels_last)
    acc = conv_codes_cpu(kind, a.codes, b.codes, geo)
    return dequantize_conv_accumulator(kind, acc, a, b, geo, bias, out_dtype, channels_last)


@torch.library.custom_op("fqt::qconv", mutates_args=())
def _qconv(
    kind: int,
    a: torch.Tensor,
    sa: torch.Tensor,
    za: torch.Tensor | None,
    oa: torch.Tensor | None,
    b: torch.Tensor,
    sb: torch.Tensor,
    zb: torch.Tensor | None,
    ob: torch.Tensor | None,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_shape: list[int],
    out_dtype: torch.dtype,
    channels_last: bool,
) -> torch.Tensor:
    gemm = CONV_KINDS[kind]
    geo = geometry_of(gemm, a.shape, b.shape, out_shape, stride, padding, dilation, groups)
    qa, qb = QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob)
    if a.device.type == "cpu":
        return qconv_cpu(gemm, qa, qb, geo, bias, out_dtype, channels_last)
    return qconv_ref(gemm, qa, qb, geo, bias, out_dtype, channels_last)


@_qconv.register_fake
def _qconv_fake(kind, a, sa, za, oa, b, sb, zb, ob, bias, stride, padding, dilation, groups, out_shape, out_dtype, channels_last):
    fmt = out_memory_format(channels_last, len(out_shape))
    return a.new_empty(out_shape, dtype=out_dtype).contiguous(memory_format=fmt)


qconv_op = torch.ops.fqt.qconv.default
