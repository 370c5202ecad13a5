"""CPU int8 convolution GEMMs: ``f(a_codes, b_codes)`` of ``fqt_compiler.conv`` on int8 codes.

* ``output`` and ``grad_input`` run on oneDNN's int8 convolution (``onednn::qconv_pointwise``),
  prepacking the weight codes on every call: in training both operands change every step, and
  oneDNN's convolution refuses unpacked weights. Activations enter as uint8 with zero point 128
  (``code ^ 0x80``: the same integers), the weight with unit scales and zero points, so the fp32
  result is the integer sum itself; every scale, zero point and offset is applied afterwards by
  ``conv.dequantize_conv_accumulator`` (oneDNN would ignore a nonzero weight zero point without
  a word).
* On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) oneDNN multiplies uint8 by int8 with
  ``vpmaddubsw``, which adds two products in int16 and *saturates*: a pair 255 x 127 + 255 x 127
  comes back as 32767, and the sums are wrong by tens of percent. Each CPU is probed once
  (:func:`onednn_int8_mode`); where the sums saturate, every weight code is split into two
  halves of at most 64 in magnitude (``w = (w >> 1) + (w - (w >> 1))``), which no pair can
  saturate, run as one convolution with twice the output channels whose halves are added.
* ``grad_input`` is the forward convolution of dY with the spatially flipped, channel-swapped
  weight. With a stride, dY's rows and columns are spread ``stride`` apart with zero codes in
  between (an exact zero: a code-domain sum), and the borders padded so the result has x's size.
* ``grad_weight`` sums over the batch and every output position, a poor fit for a direct
  convolution (its "kernel" would be dY's whole image), so it runs as one int8 GEMM per kernel
  offset: ``dY^T (K x N*P) @ x_shifted (N*P x C)``, exact in int32 (``int8_gemm.int8_mm``:
  ``torch._int_mm``, or fp32 units where this CPU multiplies int8 slowly); a grouped
  convolution's groups are one batched GEMM per offset (``int8_gemm.int8_bmm``).
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from fqt_compiler.conv import ConvGeometry
from fqt_compiler.int8_gemm import exact_bmm, int8_bmm, int8_bmm_runs_int_mm, int8_mm
from fqt_compiler.specs import GemmKind

__all__ = ["conv_codes_cpu", "onednn_available", "onednn_int8_mode", "onednn_problem", "in_order", "order_strides",
           "acc_order"]


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's int8 convolution (x86 builds with mkldnn) and it
    gives exact integer sums on this CPU (directly, or with split weights)."""
    return onednn_problem() is None


def onednn_problem() -> str | None:
    """Why convolutions on this CPU cannot run on oneDNN's int8 convolution (None: they can)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_pointwise")):
        return "this torch build has no oneDNN int8 convolution (onednn::qconv_pointwise)"
    if onednn_int8_mode() is None:
        return ("oneDNN's int8 convolution does not return exact integer sums on this CPU, even with weights split "
                "into 7-bit halves")
    return None


@functools.cache
def onednn_int8_mode() -> str | None:
    """How oneDNN's int8 convolution gives exact sums on this CPU: ``"direct"`` (VNNI / AMX: int32
    products), ``"split"`` (int16 pair sums that saturate: weights split into halves of at most
    64 in magnitude) or None (neither is exact). Measured once per process on the worst codes:
    activations at 127 (uint8 255) against weights at 127 and -128, then at 64 and -64. Asked
    while a graph is traced too: the probe runs on real tensors, outside every tracing mode."""
    with torch.utils._python_dispatch._disable_current_modes(), torch.no_grad():
        x = torch.full((1, 8, 3, 3), 127, dtype=torch.int8)
        for mode, levels in (("direct", (127, -128)), ("split", (64, -64))):
            w = torch.tensor(levels, dtype=torch.int8).repeat_interleave(8 * 9).view(2, 8, 3, 3)
            got = _onednn_sums(x, w, [1, 1], [0, 0], [1, 1], 1, 0)
            if got.flatten().tolist() == [float(8 * 9 * 127 * v) for v in levels]:
                return mode
    return None


def in_order(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``t`` with the canonical strides of dims laid out in ``order`` (outermost first). Both
    oneDNN and ``torch._int_mm`` read leading dimensions from strides, and ``contiguous()``
    leaves a size-1 dim's stride arbitrary (a (1, 8) matrix with row stride 4 came back garbage)."""
    strides = order_strides(t.shape, order)
    if tuple(t.stride()) == strides:
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def order_strides(shape, order: list[int]) -> tuple[int, ...]:
    """The strides of a dense tensor of ``shape`` whose dims are laid out in ``order``."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return tuple(strides)


def acc_order(kind: GemmKind, ndim: int) -> list[int]:
    """The memory order of :func:`conv_codes_cpu`'s result: oneDNN's channels-last for an
    image or volume (fprop, dgrad), dense otherwise."""
    if kind is not GemmKind.GRAD_WEIGHT and ndim in (4, 5):
        return [0, *range(2, ndim), 1]
    return list(range(ndim))


def _dense(t: torch.Tensor) -> torch.Tensor:
    return in_order(t, list(range(t.dim())))


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return in_order(t, [0, *range(2, t.dim()), 1]) if t.dim() in (4, 5) else _dense(t)


def _prepack_ready(w: torch.Tensor) -> torch.Tensor:
    """A weight as oneDNN's prepack reads it: dense, or channels-last as the codes of a
    channels-last model's weight come (the prepack reorders either into its own blocked
    layout, so copying one into the other first is wasted); other strides made dense."""
    if w.dim() in (4, 5) and tuple(w.stride()) == order_strides(w.shape, [0, *range(2, w.dim()), 1]):
        return w
    return _dense(w)


def _single_windows(x: torch.Tensor, k: tuple, stride: list, padding: list, dilation: list, fill: int = 0):
    """Dims with one output position and a stride > 1, rewritten as stride 1 on an input cut
    to that one window (padding made explicit): oneDNN's int8 convolution returned wrong sums
    for some of them (a stride-2 dim of output size 1)."""
    stride, padding = list(stride), list(padding)
    for i in range(x.dim() - 2):
        d, kk, p = dilation[i], k[i], padding[i]
        if stride[i] == 1 or (x.shape[2 + i] + 2 * p - d * (kk - 1) - 1) // stride[i] != 0:
            continue
        pad = [0, 0] * (x.dim() - 3 - i) + [p, p]
        x = F.pad(x, pad, value=fill).narrow(2 + i, 0, d * (kk - 1) + 1)  # the zero point's code: contributes nothing
        stride[i], padding[i] = 1, 0
    return x, stride, padding


def _explicit_wide_padding(x: torch.Tensor, k: tuple, stride: list, padding: list, dilation: list, fill: int, groups: int):
    """Padding made explicit, with the zero point's code, where oneDNN's int8 convolution got
    it wrong in random tests (wrong sums; on one thread, crashes): every padded dim of a grouped
    or single-channel convolution, and the dims padded at least as wide as the input or the
    dilated kernel's reach, or where some output's window lies wholly in the padding. Costs one
    int8 copy of the input; the usual convolutions (3x3 with padding 1, a 7x7 stem) keep
    oneDNN's own padding."""
    padding = list(padding)
    odd = groups > 1 or x.shape[1] == 1
    for i in range(x.dim() - 2):
        size, s, p, d, kk = x.shape[2 + i], stride[i], padding[i], dilation[i], k[i]
        outputs = (size + 2 * p - d * (kk - 1) - 1) // s + 1
        empty = any(not any(0 <= o * s + r * d - p < size for r in range(kk)) for o in range(outputs))
        if p and (odd or empty or p >= size or p >= d * (kk - 1)):
            x = F.pad(x, [0, 0] * (x.dim() - 3 - i) + [p, p], value=fill)
            padding[i] = 0
    return x, padding


def _onednn(
    x_codes: torch.Tensor, w_codes: torch.Tensor, stride, padding, dilation, groups: int, x_zero: int = 0
) -> torch.Tensor:
    """sum over (in channels x window) of (x_codes - x_zero) * w_codes, as fp32 (padding
    contributes 0): ``x_zero`` is oneDNN's activation zero point, exact in its int32 sums."""
    if onednn_int8_mode() != "split":
        return _onednn_sums(x_codes, w_codes, stride, padding, dilation, groups, x_zero)
    # halves within [-64, 64]: a pair of products is at most 2 x 255 x 64 = 32640 < 2^15
    high = w_codes >> 1
    low = w_codes - high
    K = w_codes.shape[0]
    both = torch.cat([high.unflatten(0, (groups, 1, K // groups)), low.unflatten(0, (groups, 1, K // groups))], 1)
    sums = _onednn_sums(x_codes, both.flatten(0, 2), stride, padding, dilation, groups, x_zero)
    halves = sums.unflatten(1, (groups, 2, K // groups))
    # added straight into the result's own layout: one pass over the sums, no copy after
    shape = (sums.shape[0], K, *sums.shape[2:])
    out = torch.empty_strided(shape, order_strides(shape, acc_order(GemmKind.OUTPUT, len(shape))), dtype=sums.dtype)
    torch.add(halves[:, :, 0], halves[:, :, 1], out=out.unflatten(1, (groups, K // groups)))
    return out


def _onednn_sums(
    x_codes: torch.Tensor, w_codes: torch.Tensor, stride, padding, dilation, groups: int, x_zero: int
) -> torch.Tensor:
    """One oneDNN int8 convolution (see :func:`_onednn`), as this CPU computes it."""
    x_codes, stride, padding = _single_windows(x_codes, tuple(w_codes.shape[2:]), stride, padding, list(dilation), x_zero)
    x_codes, padding = _explicit_wide_padding(x_codes, tuple(w_codes.shape[2:]), stride, padding, list(dilation), x_zero,
                                              groups)
    xu = _channels_last(x_codes.view(torch.uint8) ^ 0x80)  # int8 code c -> uint8 c + 128
    # one unit weight scale (per tensor): per-channel unit scales cost the prepack a host loop
    # over the channels (0.9 ms at 1024 of them) for the same sums
    ones = torch.ones(1, dtype=torch.float32)
    zeros = torch.zeros(1, dtype=torch.int64)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    packed = torch.ops.onednn.qconv_prepack(_prepack_ready(w_codes), ones, 1.0, 128, stride, padding, dilation, groups, None)
    return torch.ops.onednn.qconv_pointwise(
        xu, 1.0, 128 + x_zero, packed, ones, zeros, None, stride, padding, dilation, groups, 1.0, 0, torch.float32, "none", [],
        "",
    )


def _output(geo: ConvGeometry, x: torch.Tensor, w: torch.Tensor, x_zero: int) -> torch.Tensor:
    return _onednn(x, w, geo.stride, geo.padding, geo.dilation, geo.groups, x_zero)


def _grad_input(geo: ConvGeometry, g: torch.Tensor, w: torch.Tensor, g_zero: int) -> torch.Tensor:
    x, wt, padding, crop = geo.dgrad_as_forward(g, w, fill=g_zero)
    out = _onednn(x, wt, [1] * geo.spatial, padding, geo.dilation, geo.groups, g_zero)
    return out if crop is None else out[crop]


def _grad_weight(geo: ConvGeometry, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if all(s == 1 for s in geo.stride):
        return _grad_weight_on_grid(geo, g, x)
    N, K, *out_sp = g.shape
    rows = N
    for q in out_sp:
        rows *= q
    g_rows = g.movedim(1, -1).reshape(rows, K)  # (N*P, K)
    pads = [v for p in reversed(geo.padding) for v in (p, p)]
    sums = _OffsetSums(geo.groups, g_rows, x)
    xp = F.pad(sums.codes(x).movedim(1, -1), [0, 0, *pads])  # channels-last, zero codes in the padding
    result = torch.empty((K, x.shape[1] // geo.groups, *geo.w_shape[2:]), dtype=torch.int32)
    for offset in itertools.product(*(range(kk) for kk in geo.w_shape[2:])):
        window = tuple(slice(r * d, r * d + (q - 1) * s + 1, s) for r, d, q, s in zip(offset, geo.dilation, out_sp, geo.stride))
        shifted = xp[(slice(None), *window)].reshape(rows, x.shape[1])
        result[(slice(None), slice(None), *offset)] = sums(shifted)
    return result


def _grad_weight_on_grid(geo: ConvGeometry, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """wgrad of a stride-1 convolution with no copy per kernel offset. On the zero-padded
    input's grid, flattened channels-last into rows, output position p reads input row
    p + offset(r) for kernel offset r: dY is laid on that grid (zero rows where no output
    is), and each offset's input operand is a contiguous slice of the padded input's rows."""
    N, K, *out_sp = g.shape
    C = x.shape[1]
    k = geo.w_shape[2:]
    grid = [h + 2 * p for h, p in zip(x.shape[2:], geo.padding)]
    row_stride = [1] * len(grid)
    for i in range(len(grid) - 2, -1, -1):
        row_stride[i] = row_stride[i + 1] * grid[i + 1]
    m = N * row_stride[0] * grid[0]
    reach = sum((kk - 1) * d * rs for kk, d, rs in zip(k, geo.dilation, row_stride))
    gp = g.new_zeros((m, K))
    gp.view(N, *grid, K)[(slice(None), *(slice(0, q) for q in out_sp))] = g.movedim(1, -1)
    sums = _OffsetSums(geo.groups, gp, x)
    xp = x.new_zeros((m + reach, C), dtype=sums.dtype)  # zero rows past the end: the last offsets' slices stay inside
    inner = tuple(slice(p, p + h) for p, h in zip(geo.padding, x.shape[2:]))
    xp[:m].view(N, *grid, C)[(slice(None), *inner)] = x.movedim(1, -1)  # converted by the copy
    result = torch.empty((K, C // geo.groups, *k), dtype=torch.int32)
    for offset in itertools.product(*(range(kk) for kk in k)):
        start = sum(r * d * rs for r, d, rs in zip(offset, geo.dilation, row_stride))
        result[(slice(None), slice(None), *offset)] = sums(xp[start:start + m])
    return result


class _OffsetSums:
    """One kernel offset's weight gradient ``dY^T @ x_shifted`` (K, C/G), exact int32, from
    (rows, K) and (rows, C) codes. One int8 GEMM per offset without groups. With groups the
    per-group GEMMs are small (a depthwise convolution's are 1 x 1), and a library call per
    group and offset cost 100x the work: the codes are converted once, to int16 for a
    depthwise convolution (products of int8 codes fit; one multiply-and-sum pass per offset)
    or to fp32 for batched GEMMs in exact chunks, unless each group's GEMM is large enough for
    one ``torch._int_mm`` call per group on a CPU that multiplies int8 fast."""

    def __init__(self, groups: int, g_rows: torch.Tensor, x: torch.Tensor) -> None:
        self.groups = groups
        kg, cg = g_rows.shape[1] // groups, x.shape[1] // groups
        if groups == 1 or int8_bmm_runs_int_mm(x.device, kg, cg):
            self.dtype = torch.int8
        else:
            self.dtype = torch.int16 if kg == cg == 1 else torch.float32
        self.g_rows = self.codes(g_rows)

    def codes(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s codes in the dtype the sums run in."""
        return t.to(self.dtype)

    def __call__(self, x_rows: torch.Tensor) -> torch.Tensor:
        g_rows, groups = self.g_rows, self.groups
        if groups == 1:
            return int8_mm(_gemm_ready(g_rows.t()), _gemm_ready(x_rows))
        rows, K = g_rows.shape
        if self.dtype == torch.int16:  # depthwise: K == C == groups
            return (g_rows * x_rows).sum(0, dtype=torch.int32).view(K, 1)
        a = g_rows.view(rows, groups, K // groups).permute(1, 2, 0)  # (G, K/G, rows)
        b = x_rows.reshape(rows, groups, -1).transpose(0, 1)  # (G, rows, C/G)
        sums = int8_bmm(a, b) if self.dtype == torch.int8 else exact_bmm(a, b)
        return sums.reshape(K, -1)


def _gemm_ready(t: torch.Tensor) -> torch.Tensor:
    """A 2-D operand ``torch._int_mm`` reads correctly: row- or column-major with no size-1
    dim (it takes a transposed view as it is; a degenerate stride it misreads is copied)."""
    if min(t.shape) > 1 and (t.stride(1) == 1 and t.stride(0) == t.shape[1] or t.stride(0) == 1 and t.stride(1) == t.shape[0]):
        return t
    return _dense(t)


def conv_codes_cpu(kind: GemmKind, a: torch.Tensor, b: torch.Tensor, geo: ConvGeometry, a_zero: int = 0) -> torch.Tensor:
    """``geo.bilinear(kind, a - a_zero, b)`` on int8 codes: fprop and dgrad as fp32 (oneDNN's
    int32 sums, rounded to fp32 where they pass 2**24 -- the reference's fp64 sums convert the
    same way), wgrad as the exact int32 sums (``a_zero`` must be 0 there)."""
    if kind is GemmKind.OUTPUT:
        return _output(geo, a, b, a_zero)
    if kind is GemmKind.GRAD_INPUT:
        return _grad_input(geo, a, b, a_zero)
    if a_zero:
        raise ValueError("conv_codes_cpu: wgrad takes no zero point (apply it in the epilogue)")
    return _grad_weight(geo, a, b)
