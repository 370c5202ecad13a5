"""Convolutions as three low-bit GEMMs: geometry, scale legality and the reference epilogue.

A convolution's forward (``output``), input gradient (``grad_input``, dgrad) and weight gradient
(``grad_weight``, wgrad) are bilinear maps ``f(a, b)`` of two operands:

==============  ====================  =====================  ==========================
GEMM            a (row statistics)    b (column statistics)  contracted over
==============  ====================  =====================  ==========================
``output``      x, per sample         w, per out channel     in channels x window
``grad_input``  dY, per sample        w, per in channel      out channels x window
``grad_weight`` dY, per out channel   x, per in channel      batch x output positions
==============  ====================  =====================  ==========================

An operand's scale may vary only along its column of that table (or not at all): then it is
constant along the contraction and factors out of the sum, which is what lets an integer
convolution run on the codes and apply the scales afterwards (:func:`layout_problem` says why
not otherwise). Zero points and offsets need more than a rescale, because a convolution sums
over the *valid* part of each window only (padding contributes zero, not ``-zero_point``):

    f(a_hat, b_hat) = sa sb f(ca - za, cb - zb) + sa ob f(ca - za, 1) + oa sb f(1, cb - zb) + oa ob f(1, 1)

with ``1`` an all-ones operand, so every correction is a *windowed sum* of one operand's codes.
Each is computed on the operand reduced over the dims the ones cover (a channel sum, a batch
sum), then convolved with a small all-ones kernel: O(input) work, exact in fp64.
:func:`qconv_ref` is the pure-torch reference (the integer convolution in fp64, exact);
the CPU kernels share :func:`dequantize_conv_accumulator`, so both apply the same epilogue.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .grid import QOperand
from .int8_gemm import int8_mm
from .specs import GemmKind

__all__ = [
    "ConvGeometry", "layout_problem", "qconv_ref", "dequantize_conv_accumulator", "out_memory_format", "is_channels_last",
    "foldable_zero_point", "channel_sums", "batch_sums", "GROUP_GEMM_MIN",
]

# The least output and input channels per group for which a grouped convolution's weight
# gradient runs on the GPU's Triton GEMM, one launch per group and kernel offset; smaller groups
# (a depthwise layer's are 1 x 1) are one batched GEMM per offset instead
GROUP_GEMM_MIN = 16

aten = torch.ops.aten

# the axis of each operand that its statistics may vary along, per GEMM (see the module table)
_A_AXIS = {GemmKind.OUTPUT: 0, GemmKind.GRAD_INPUT: 0, GemmKind.GRAD_WEIGHT: 1}
_B_AXIS = {GemmKind.OUTPUT: 0, GemmKind.GRAD_INPUT: 1, GemmKind.GRAD_WEIGHT: 1}
_WHAT = {
    GemmKind.OUTPUT: ("activation", "per sample", "weight", "per output channel", "in channels x kernel window"),
    GemmKind.GRAD_INPUT: ("grad_output", "per sample", "weight", "per input channel", "out channels x kernel window"),
    GemmKind.GRAD_WEIGHT: ("grad_output", "per output channel", "activation", "per input channel", "batch x output positions"),
}


@dataclass(frozen=True)
class ConvGeometry:
    """One (non-transposed) convolution: its hyper-parameters and the shapes of x, w and y."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    y_shape: tuple[int, ...]

    @classmethod
    def of_call(cls, kind: GemmKind, a_shape, b_shape, out_shape, stride, padding, dilation, groups) -> ConvGeometry:
        """The convolution behind one ``fqt::qconv`` call: its operands' and result's shapes by role."""
        a, b, out = tuple(a_shape), tuple(b_shape), tuple(out_shape)
        x, w, y = {
            GemmKind.OUTPUT: (a, b, out),
            GemmKind.GRAD_INPUT: (out, b, a),
            GemmKind.GRAD_WEIGHT: (b, out, a),
        }[kind]
        return cls(tuple(stride), tuple(padding), tuple(dilation), int(groups), x, w, y)

    @property
    def small_groups(self) -> bool:
        """Grouped, with fewer than ``GROUP_GEMM_MIN`` output or input channels per group: its
        weight gradient on the GPU runs as one batched GEMM per kernel offset."""
        return self.groups > 1 and min(self.w_shape[0] // self.groups, self.w_shape[1]) < GROUP_GEMM_MIN

    @property
    def spatial(self) -> int:
        return len(self.x_shape) - 2

    def out_shape(self, kind: GemmKind) -> tuple[int, ...]:
        return {GemmKind.OUTPUT: self.y_shape, GemmKind.GRAD_INPUT: self.x_shape, GemmKind.GRAD_WEIGHT: self.w_shape}[kind]

    def operand_shapes(self, kind: GemmKind) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return {
            GemmKind.OUTPUT: (self.x_shape, self.w_shape),
            GemmKind.GRAD_INPUT: (self.y_shape, self.w_shape),
            GemmKind.GRAD_WEIGHT: (self.y_shape, self.x_shape),
        }[kind]

    # ------------------------------------------------------------- the three bilinear maps
    def conv(self, x: torch.Tensor, w: torch.Tensor, groups: int | None = None) -> torch.Tensor:
        g = self.groups if groups is None else groups
        zeros = [0] * self.spatial
        return aten.convolution(x, w, None, list(self.stride), list(self.padding), list(self.dilation), False, zeros, g)

    def dgrad(self, g: torch.Tensor, w: torch.Tensor, x_shape: tuple[int, ...], groups: int | None = None) -> torch.Tensor:
        """The input gradient of a convolution of this geometry (``groups`` overrides its own)
        whose input has ``x_shape``: a forward convolution (:meth:`dgrad_as_forward`), so
        that every device with a convolution runs it."""
        geo = self if groups is None else replace(self, groups=groups)
        geo = replace(geo, x_shape=tuple(x_shape), w_shape=tuple(w.shape), y_shape=tuple(g.shape))
        x, wt, padding, crop = geo.dgrad_as_forward(g, w)
        zeros = [0] * self.spatial
        out = aten.convolution(x, wt, None, [1] * self.spatial, padding, list(self.dilation), False, zeros, geo.groups)
        return out if crop is None else out[crop]

    def wgrad(self, g: torch.Tensor, x: torch.Tensor, w_shape: tuple[int, ...], groups: int | None = None) -> torch.Tensor:
        """The weight gradient (of ``w_shape``) of a convolution of this geometry: the forward
        convolution of x with dY whose batch and channel axes are swapped (x as C/G images of
        G*N channels, dY as K filters of N channels), stride and dilation exchanged."""
        G = self.groups if groups is None else groups
        N, C = x.shape[:2]
        K, k = w_shape[0], list(w_shape[2:])
        if N == 0:  # nothing summed (a batch of 0): a convolution over no channels is no answer
            return x.new_zeros((K, C // G, *k))
        sp = list(range(3, x.dim() + 1))
        xt = x.reshape(N, G, C // G, *x.shape[2:]).permute(2, 1, 0, *sp).reshape(C // G, G * N, *x.shape[2:])
        gt = g.transpose(0, 1)  # (K, N, *out): K filters over N channels, K/G per group
        zeros = [0] * self.spatial
        out = aten.convolution(xt, gt, None, list(self.dilation), list(self.padding), list(self.stride), False, zeros, G)
        out = out[(slice(None), slice(None), *(slice(0, kk) for kk in k))]  # (C/G, K, *k): windows past the kernel dropped
        return out.transpose(0, 1).reshape(K, C // G, *k)

    def dgrad_as_forward(
        self, g: torch.Tensor, w: torch.Tensor, fill: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], tuple | None]:
        """dgrad as a forward convolution (stride 1, this dilation, this groups): (input, weight,
        padding, crop of the result or None). The weight is flipped in space with its in / out
        channels swapped per group; the input is dY as :meth:`_dgrad_spread` lays it out."""
        G, n = self.groups, self.spatial
        K, Cg, *k = w.shape
        swapped = w.reshape(G, K // G, Cg, *k).transpose(1, 2).reshape(G * Cg, K // G, *k)
        # fp8 has no flip kernel: flip the bytes (a 1-byte dtype's bits move unchanged)
        raw = swapped.view(torch.uint8) if swapped.dtype.is_floating_point and swapped.element_size() == 1 else swapped
        wt = raw.flip(list(range(2, 2 + n))).view(swapped.dtype)
        x, padding, crop = self._dgrad_spread(g, fill)
        return x, wt, padding, crop

    def _dgrad_spread(self, g: torch.Tensor, fill: int = 0) -> tuple[torch.Tensor, list[int], tuple | None]:
        """dY laid out for dgrad as a stride-1 forward convolution of this geometry's kernel
        (``w_shape``): (input, padding, crop of the result or None). With a stride, or
        a padding past the window, dY is spread ``stride`` apart with ``fill`` between and
        padded explicitly with it (the code that contributes nothing: 0, or a zero point the
        kernel subtracts), and a negative pad becomes a crop of the result."""
        n, k = self.spatial, self.w_shape[2:]
        lo = [d * (kk - 1) - p for d, kk, p in zip(self.dilation, k, self.padding)]
        if all(s == 1 for s in self.stride) and all(v >= 0 for v in lo):
            return g, lo, None
        out_sp, in_sp = self.x_shape[2:], g.shape[2:]
        dims = zip(out_sp, self.padding, self.dilation, k, self.stride)
        extra = [(h + 2 * p - d * (kk - 1) - 1) % s for h, p, d, kk, s in dims]  # rows past the last window
        hi = [a + e for a, e in zip(lo, extra)]
        # (q - 1) s + 1 + e is h + 2p - d (k - 1) exactly; with lo >= 0 the size is then
        # h + d (k - 1), written so: the floor and remainder of a symbolic h would not cancel,
        # and the result would not be provably x's size (h) where the epilogue broadcasts it
        size = [h + d * (kk - 1) if a >= 0 else (q - 1) * s + 1 + max(b, 0)
                for h, d, kk, q, s, a, b in zip(out_sp, self.dilation, k, in_sp, self.stride, lo, hi)]
        spread = g.new_full((g.shape[0], g.shape[1], *size), fill)
        index = tuple(slice(max(a, 0), max(a, 0) + (q - 1) * s + 1, s) for a, q, s in zip(lo, in_sp, self.stride))
        spread[(slice(None), slice(None), *index)] = g
        crop = (slice(None), slice(None), *(slice(max(-a, 0), max(-a, 0) + h) for a, h in zip(lo, out_sp)))
        return spread, [0] * n, crop

    def bilinear(self, kind: GemmKind, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The GEMM ``kind`` of this convolution on high-precision ``a`` and ``b``."""
        if kind is GemmKind.OUTPUT:
            return self.conv(a, b)
        if kind is GemmKind.GRAD_INPUT:
            return self.dgrad(a, b, self.x_shape)
        return self.wgrad(a, b, self.w_shape)

    # ------------------------------------------------------------- windowed sums (the corrections)
    # ``f(a, 1)``, ``f(1, b)`` and ``f(1, 1)`` sum one operand's codes (first reduced over the
    # dims the ones cover) over each output's valid window. With at most ``WINDOW_OFFSETS``
    # kernel offsets they are written as one strided view of the zero-padded operand per offset,
    # summed in int64 for integer codes: exact, and pointwise, so that Inductor fuses them into
    # the epilogue that reads them (an fp64 convolution with ones ran on torch's slow reference
    # convolution, a millisecond per call). Larger kernels convolve with ones in fp64.
    def _few_offsets(self) -> bool:
        return _count(self.w_shape[2:]) <= WINDOW_OFFSETS

    def sum_a(self, kind: GemmKind, a: torch.Tensor) -> torch.Tensor:
        """``f(a, 1)``: each output element's windowed sum of ``a`` (b all ones), in fp64, with
        size 1 along the output's dim 1 where every channel shares it (no groups)."""
        if not self._few_offsets():
            return self._sum_a_conv(kind, a)
        G, k, n = self.groups, self.w_shape[2:], self.spatial
        if kind is GemmKind.GRAD_WEIGHT:  # sum dY over the batch, then over each offset's positions
            sums = self._offset_sums(batch_sums(a), _grid_ones(a, self.x_shape[2:]))
            return sums.reshape(self.w_shape[0], 1, *k).to(torch.float64).expand(*self.w_shape[:2], *[-1] * n)
        s = channel_sums(a, G)  # each group's channel sum, then over the window
        if kind is GemmKind.OUTPUT:
            out, per = _window_sum(s, k, self.stride, self.padding, self.dilation, self.y_shape[2:]), self.y_shape[1] // G
        else:
            out, per = self._dgrad_window_sum(s), self.x_shape[1] // G
        return (out if G == 1 else out.repeat_interleave(per, 1)).to(torch.float64)

    def sum_b(self, kind: GemmKind, b: torch.Tensor) -> torch.Tensor:
        """``f(1, b)``: each output element's windowed sum of ``b`` (a all ones), in fp64: one
        image, broadcast over the batch (fprop, dgrad), or one weight (wgrad)."""
        if not self._few_offsets():
            return self._sum_b_conv(kind, b)
        G, K, k = self.groups, self.w_shape[0], self.w_shape[2:]
        if kind is GemmKind.OUTPUT:  # each filter's sum over its in channels, at each valid offset
            wsum = _summed(b, 1).reshape(1, K, -1)
            masks = _views(_grid_ones(b, self.x_shape[2:]), k, self.stride, self.padding, self.dilation, self.y_shape[2:])
            out = _weighted(wsum, masks)
        elif kind is GemmKind.GRAD_INPUT:  # each in channel's sum over its group's filters, flipped
            wsum = _summed(b.reshape(G, K // G, *b.shape[1:]), 1).flip(list(range(2, 2 + self.spatial)))
            spread, padding, crop = self._dgrad_spread(_grid_ones(b, self.y_shape[2:]))
            masks = _views(spread, k, [1] * self.spatial, padding, self.dilation, _window_out(spread, k, padding,
                                                                                                self.dilation))
            out = _weighted(wsum.reshape(1, -1, _count(k)), masks)
            out = out if crop is None else out[crop]
        else:  # each in channel's batch sum over each offset's positions, the same for every filter of its group
            sums = self._offset_sums(_grid_ones(b, self.y_shape[2:]), batch_sums(b))
            out = sums.reshape(G, -1, *k).repeat_interleave(K // G, 0)
        return out.to(torch.float64)

    def sum_ones(self, kind: GemmKind, like: torch.Tensor) -> torch.Tensor:
        """``f(1, 1)``: how many products each output element sums (the valid window size)."""
        if not self._few_offsets():
            return self._sum_ones_conv(kind, like)
        G, k = self.groups, self.w_shape[2:]
        if kind is GemmKind.OUTPUT:
            ones = _grid_ones(like, self.x_shape[2:])
            out = _window_sum(ones, k, self.stride, self.padding, self.dilation, self.y_shape[2:]) * (self.x_shape[1] // G)
        elif kind is GemmKind.GRAD_INPUT:
            out = self._dgrad_window_sum(_grid_ones(like, self.y_shape[2:])) * (self.w_shape[0] // G)
        else:
            sums = self._offset_sums(_grid_ones(like, self.y_shape[2:]), _grid_ones(like, self.x_shape[2:]))
            out = sums.reshape(1, 1, *k) * self.x_shape[0]
        return out.to(torch.float64)

    def _dgrad_window_sum(self, s: torch.Tensor) -> torch.Tensor:
        """The input gradient of an all-ones kernel, per channel of ``s`` (on the output grid)."""
        k = self.w_shape[2:]
        spread, padding, crop = self._dgrad_spread(s)
        out = _window_sum(spread, k, [1] * self.spatial, padding, self.dilation, _window_out(spread, k, padding, self.dilation))
        return out if crop is None else out[crop]

    def _offset_sums(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(1, C, offsets): for each kernel offset, the sum over the output positions of ``g``
        (1, ., *out) times the input ``x`` (1, ., *in) they read there (one of the two has one
        channel): the weight gradient of single images, offset by offset."""
        dims = list(range(2, 2 + self.spatial))
        views = _views(x, self.w_shape[2:], self.stride, self.padding, self.dilation, self.y_shape[2:])
        return torch.stack([(g * v).sum(dims) for v in views], -1)

    def _sum_a_conv(self, kind: GemmKind, a: torch.Tensor) -> torch.Tensor:
        """:meth:`sum_a` by fp64 convolutions with all-ones operands (kernels of many offsets)."""
        G, k = self.groups, self.w_shape[2:]
        n = self.spatial
        if kind in (GemmKind.OUTPUT, GemmKind.GRAD_INPUT):
            s = channel_sums(a, G).to(torch.float64)
            if kind is GemmKind.OUTPUT:
                out, per = self.conv(s, _ones(a, G, 1, *k), G), self.y_shape[1] // G
            else:
                out, per = self.dgrad(s, _ones(a, G, 1, *k), (a.shape[0], G, *self.x_shape[2:]), G), self.x_shape[1] // G
            return out if G == 1 else out.repeat_interleave(per, 1)
        gsum = batch_sums(a).to(torch.float64)
        ones_x = _ones(a, 1, G, *self.x_shape[2:])
        return self.wgrad(gsum, ones_x, (self.w_shape[0], 1, *k), G).expand(*self.w_shape[:2], *[-1] * n)

    def _sum_b_conv(self, kind: GemmKind, b: torch.Tensor) -> torch.Tensor:
        """:meth:`sum_b` by fp64 convolutions with all-ones operands."""
        G, K = self.groups, self.w_shape[0]
        if kind is GemmKind.OUTPUT:
            return self.conv(_ones(b, 1, G, *self.x_shape[2:]), _summed(b, 1, keepdim=True).to(torch.float64), G)
        if kind is GemmKind.GRAD_INPUT:
            wsum = _summed(b.reshape(G, K // G, *b.shape[1:]), 1).to(torch.float64)
            return self.dgrad(_ones(b, 1, G, *self.y_shape[2:]), wsum, (1, *self.x_shape[1:]), G)
        xsum = batch_sums(b).to(torch.float64)
        ones_g = _ones(b, 1, G, *self.y_shape[2:])
        return self.wgrad(ones_g, xsum, (G, *self.w_shape[1:]), G).repeat_interleave(K // G, 0)

    def _sum_ones_conv(self, kind: GemmKind, like: torch.Tensor) -> torch.Tensor:
        """:meth:`sum_ones` by fp64 convolutions with all-ones operands."""
        G, k = self.groups, self.w_shape[2:]
        one_k = _ones(like, 1, 1, *k)
        if kind is GemmKind.OUTPUT:
            return self.conv(_ones(like, 1, 1, *self.x_shape[2:]), one_k, 1) * (self.x_shape[1] // G)
        if kind is GemmKind.GRAD_INPUT:
            ones_g = _ones(like, 1, 1, *self.y_shape[2:])
            return self.dgrad(ones_g, one_k, (1, 1, *self.x_shape[2:]), 1) * (self.w_shape[0] // G)
        ones_g, ones_x = _ones(like, 1, 1, *self.y_shape[2:]), _ones(like, 1, 1, *self.x_shape[2:])
        return self.wgrad(ones_g, ones_x, (1, 1, *k), 1) * self.x_shape[0]

    # ------------------------------------------------------------- statistics onto the output
    def stat_a(self, kind: GemmKind, t: torch.Tensor | None) -> torch.Tensor | None:
        """``a``'s statistic as a tensor broadcastable against the output (dim 0)."""
        if t is None or t.numel() == 1:
            return None if t is None else t.reshape(())
        nd = len(self.out_shape(kind))
        return t.reshape(-1, *(1,) * (nd - 1))

    def stat_b(self, kind: GemmKind, t: torch.Tensor | None) -> torch.Tensor | None:
        """``b``'s statistic onto the output's dim 1 (input channels repeat per group in dgrad;
        in wgrad, output (k, c) reads input channel (group of k) * C/G + c)."""
        if t is None or t.numel() == 1:
            return None if t is None else t.reshape(())
        out = self.out_shape(kind)
        nd, G = len(out), self.groups
        v = t.reshape(-1)
        if kind is GemmKind.OUTPUT:
            return v.reshape(1, -1, *(1,) * (nd - 2))
        if kind is GemmKind.GRAD_INPUT:
            return v.repeat(G).reshape(1, -1, *(1,) * (nd - 2))
        per_group = v.reshape(G, v.shape[0] // G).repeat_interleave(out[0] // G, 0)  # (K, C/G)
        return per_group.reshape(*out[:2], *(1,) * (nd - 2))


# kernels with more offsets than this sum their windows by an fp64 convolution with ones (one
# traced op per offset stops paying: a 1-D kernel can be hundreds long)
WINDOW_OFFSETS = 64


def _count(k) -> int:
    total = 1
    for kk in k:
        total *= kk
    return total


def _views(t: torch.Tensor, k, stride, padding, dilation, out_sp):
    """For each kernel offset (in row-major order), the view of ``t`` (B, C, *in), zero-padded,
    that the outputs (B, C, *out_sp) read at that offset."""
    if any(p != 0 for p in padding):
        t = F.pad(t, [v for p in reversed(padding) for v in (p, p)])
    for r in itertools.product(*(range(kk) for kk in k)):
        window = tuple(slice(i * d, i * d + (q - 1) * s + 1, s) for i, d, q, s in zip(r, dilation, out_sp, stride))
        yield t[(slice(None), slice(None), *window)]


def _window_sum(t: torch.Tensor, k, stride, padding, dilation, out_sp) -> torch.Tensor:
    """Each channel of ``t`` summed over every output's window (zero padding), in its dtype."""
    views = _views(t, k, stride, padding, dilation, out_sp)
    total = next(views)
    for v in views:
        total = total + v
    return total


def _window_out(t: torch.Tensor, k, padding, dilation) -> list:
    """The output size of a stride-1 window over ``t`` (B, C, *in)."""
    return [h + 2 * p - d * (kk - 1) for h, p, d, kk in zip(t.shape[2:], padding, dilation, k)]


def _weighted(w: torch.Tensor, masks) -> torch.Tensor:
    """sum over offsets r of ``w[..., r]`` (1, C, offsets) times the r-th mask (1, 1, *out)."""
    total = None
    for r, m in enumerate(masks):
        term = w[:, :, r].reshape(*w.shape[:2], *(1,) * (m.dim() - 2)) * m
        total = term if total is None else total + term
    return total


def _grid_ones(like: torch.Tensor, spatial) -> torch.Tensor:
    """(1, 1, *spatial) int64 ones: the all-ones operand of an exact windowed sum."""
    return torch.ones((1, 1, *spatial), dtype=torch.int64, device=like.device)


def _ones(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """An all-ones fp64 operand of the convolved windowed sums, materialized (small: kernels,
    single images): ``expand``-ed ones made some backends' convolutions copy them anyway."""
    return torch.ones(shape, dtype=torch.float64, device=like.device)


def channel_sums(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, G, *spatial): each group's channel sum of ``t`` (N, C, *spatial), exact (int64 for
    integer codes, fp64 for float codes). Int8 codes laid out channels-last sum as one int8
    GEMM against a block of ones (a reduction with an int64 accumulator converted the whole
    tensor first: 50x slower)."""
    n, c = t.shape[:2]
    if c == groups:  # a depthwise convolution's: each group's sum is its one channel
        return t.to(torch.float64 if t.dtype.is_floating_point else torch.int64)
    rows = t.movedim(1, -1)
    # int8_mm may run torch._int_mm, which misreads a size-1 dim's stride: both operands keep every dim > 1
    if t.dtype == torch.int8 and rows.is_contiguous() and c > 1 and t.numel() > c:
        column = torch.arange(max(groups, 8), device=t.device)
        ones = (torch.arange(c, device=t.device).unsqueeze(1) // (c // groups) == column).to(torch.int8)
        sums = int8_mm(rows.reshape(-1, c), ones)[:, :groups].reshape(*rows.shape[:-1], groups)
        return sums.movedim(-1, 1).to(torch.int64)
    return _summed(t.reshape(n, groups, c // groups, *t.shape[2:]), 2)


def batch_sums(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, ...) summed over the batch, keeping a size-1 dim 0, exact as
    :func:`channel_sums` (int8 codes: one int8 GEMM against ones where the rest of each sample
    is one run of memory)."""
    n = t.shape[0]
    order = t.movedim(1, -1) if t.dim() >= 3 and not t.is_contiguous() else t
    if t.dtype == torch.int8 and order.is_contiguous() and n > 1 and t.numel() > n:
        ones = torch.ones((8, n), dtype=torch.int8, device=t.device)  # 8 rows: no size-1 dim (see channel_sums)
        sums = int8_mm(ones, order.reshape(n, -1))[:1].reshape(1, *order.shape[1:])
        return (sums.movedim(-1, 1) if order is not t else sums).to(torch.int64)
    return _summed(t, 0, keepdim=True)


def _summed(t: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """``t`` summed over ``dim``, exact: integer codes as int64 (no fp64 copy of the whole
    tensor), float codes in fp64."""
    if t.dtype.is_floating_point:
        return t.to(torch.float64).sum(dim, keepdim=keepdim)
    return t.sum(dim, keepdim=keepdim, dtype=torch.int64)


def out_memory_format(channels_last: bool, ndim: int) -> torch.memory_format:
    """The memory order of a low-bit convolution's result: the traced convolution's own
    (channels-last where it was, else contiguous), so the graph's later views still apply."""
    if channels_last and ndim == 4:
        return torch.channels_last
    if channels_last and ndim == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is laid out channels-last and not also plainly contiguous."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


def layout_problem(kind: GemmKind, geo: ConvGeometry, a_stats: list, b_stats: list) -> str | None:
    """Why the statistics of ``a`` / ``b`` (shapes, or None) cannot be applied after the
    convolution of their codes; None when they can."""
    a_shape, b_shape = geo.operand_shapes(kind)
    a_role, a_ok, b_role, b_ok, over = _WHAT[kind]
    sides = ((a_stats, a_shape, _A_AXIS[kind], a_role, a_ok), (b_stats, b_shape, _B_AXIS[kind], b_role, b_ok))
    for stats, shape, axis, role, ok in sides:
        for s in stats:
            if s is None or len(s) == 0 or all(d == 1 for d in s):
                continue
            if len(s) != len(shape) or any(d != 1 for i, d in enumerate(s) if i != axis) or s[axis] != shape[axis]:
                return (f"{role} scales of shape {tuple(s)} vary along the contraction ({over}); "
                        f"{kind.value} can apply per-tensor or {ok} scales (the int8 recipe's ROW / CHANNEL specs)")
    return None


def foldable_zero_point(zero_point: torch.Tensor | None) -> int | None:
    """A zero point oneDNN can subtract in its int32 sums: one integer code (per tensor; the
    paper's asymmetric activations' -128 among them). Exact, and the largest correction term
    then never meets the fp32 accumulator. Reads the value (a host sync on an accelerator)."""
    if zero_point is None or zero_point.numel() != 1:
        return None
    z = float(zero_point)
    return int(z) if z.is_integer() and -128 <= z <= 127 else None


def qconv_ref(
    kind: GemmKind, a: QOperand, b: QOperand, geo: ConvGeometry, bias: torch.Tensor | None, out_dtype: torch.dtype,
    channels_last: bool = False,
) -> torch.Tensor:
    """The GEMM ``kind`` of a convolution on the codes, dequantized in the epilogue (the
    reference of every low-bit convolution kernel). Integer codes convolve exactly in fp64."""
    acc_dtype = torch.float64 if not a.codes.dtype.is_floating_point else torch.float32
    acc = geo.bilinear(kind, a.codes.to(acc_dtype), b.codes.to(acc_dtype))
    return dequantize_conv_accumulator(kind, acc, a, b, geo, bias, out_dtype, channels_last)


def dequantize_conv_accumulator(
    kind: GemmKind, acc: torch.Tensor, a: QOperand, b: QOperand, geo: ConvGeometry, bias: torch.Tensor | None,
    out_dtype: torch.dtype, channels_last: bool = False, owned: bool = False, a_zero_folded: bool = False,
) -> torch.Tensor:
    """The epilogue of :func:`qconv_ref` given ``acc = f(a.codes, b.codes)`` (fp64 exact, or the
    fp32 a kernel wrote; ``owned``: it may be overwritten). Symmetric codes: ``acc * (sa * sb)``
    in one pass. Zero points and offsets: from an fp64 ``acc`` the exact integer terms in the
    order of ``reference.dequantize_accumulator``; from a kernel's fp32 ``acc``, the same terms
    regrouped by the tensor each multiplies, as in-place fp32 passes over the result. An
    integer ``acc`` (exact sums) takes the exact path. ``a_zero_folded``: ``acc`` is
    ``f(a.codes - a.zero_point, b.codes)``, the kernel having subtracted ``a``'s per-tensor
    zero point."""
    sa, sb = geo.stat_a(kind, a.scale).to(torch.float32), geo.stat_b(kind, b.scale).to(torch.float32)
    if a.zero_point is None and b.zero_point is None and a.offset is None and b.offset is None:
        # one pass over the result, in place: the combined scale is (rows x channels), tiny
        out = acc.to(torch.float32, copy=acc.dtype == torch.float32 and not owned).mul_(sa * sb)
    elif acc.dtype == torch.float64 or not acc.dtype.is_floating_point:
        out = _exact_affine(kind, acc, a, b, geo, sa, sb)
    else:
        out = _affine_in_place(kind, acc.to(torch.float32, copy=acc.dtype == torch.float32 and not owned), a, b, geo, sa, sb,
                               a_zero_folded)
    if bias is not None:
        out = out.add_(bias.to(torch.float32).reshape(1, -1, *(1,) * (out.dim() - 2)))
    return out.to(out_dtype).contiguous(memory_format=out_memory_format(channels_last, out.dim()))


def _stats(kind: GemmKind, a: QOperand, b: QOperand, geo: ConvGeometry, dtype: torch.dtype) -> tuple:
    """za, zb, oa, ob onto the output (None where absent)."""
    def on(t, fn):
        s = fn(kind, t)
        return None if s is None else s.to(dtype)

    return on(a.zero_point, geo.stat_a), on(b.zero_point, geo.stat_b), on(a.offset, geo.stat_a), on(b.offset, geo.stat_b)


def _exact_affine(kind, acc, a, b, geo, sa, sb) -> torch.Tensor:
    """The reference: T1 = f(ca - za, cb - zb) and the other terms as exact fp64 integers."""
    wide = torch.float64
    zero = torch.zeros((), dtype=wide, device=acc.device)
    za, zb, oa, ob = (zero if t is None else t for t in _stats(kind, a, b, geo, wide))
    oa, ob = oa.float(), ob.float()
    fa1, f1b, f11 = geo.sum_a(kind, a.codes), geo.sum_b(kind, b.codes), geo.sum_ones(kind, zero)
    t1 = acc.to(wide) - zb * fa1 - za * f1b + za * zb * f11
    t2 = (fa1 - za * f11).to(torch.float32)
    t3 = (f1b - zb * f11).to(torch.float32)
    return (t1.to(torch.float32) * sa) * sb + (sa * ob) * t2 + (oa * sb) * t3 + (oa * ob) * f11.to(torch.float32)


def _affine_in_place(kind, out, a, b, geo, sa, sb, a_zero_folded: bool = False) -> torch.Tensor:
    """out = acc * sa sb + f(a, 1) * sa (ob - sb zb) + f(1, b) * sb (oa - sa za) + f(1, 1) * γ,
    γ = sa sb za zb - sa ob za - oa sb zb + oa ob: every coefficient a (rows x channels) tensor,
    every windowed sum small or broadcast, so four fp32 passes at most over the result. With
    ``a``'s zero point folded into ``acc``, ``za`` is 0 here and f(a, 1) is f(a - za, 1)."""
    za, zb, oa, ob = _stats(kind, a, b, geo, torch.float32)
    zero = torch.zeros((), dtype=torch.float32, device=out.device)
    if a_zero_folded:
        za = None
    za_, zb_, oa_, ob_ = (zero if t is None else t for t in (za, zb, oa, ob))
    out.mul_(sa * sb)
    if zb is not None or ob is not None:
        fa1 = geo.sum_a(kind, a.codes)
        if a_zero_folded:
            fa1 = fa1 - a.zero_point.reshape(()).to(fa1.dtype) * geo.sum_ones(kind, fa1)
        out.add_(fa1.to(torch.float32) * (sa * (ob_ - sb * zb_)))
    if za is not None or oa is not None:
        out.add_(geo.sum_b(kind, b.codes).to(torch.float32) * (sb * (oa_ - sa * za_)))
    gamma = sa * sb * za_ * zb_ - sa * ob_ * za_ - oa_ * sb * zb_ + oa_ * ob_
    if (za is not None or oa is not None) and (zb is not None or ob is not None):
        out.add_(geo.sum_ones(kind, zero).to(torch.float32) * gamma)
    return out
