"""How a tensor maps onto the 2-D *natural* matrix every quantizer works on.

A GEMM operand is quantized in its natural layout (rows x columns, see ``specs.py``): rows are
samples or tokens, columns the features a row's scale runs over. :class:`Layout` says how a
tensor, as a GEMM consumes it, maps onto that matrix; the helpers here move tensors and their
scales between the two views. Shared by the reference quantizers, the kernels and the passes.
"""

from __future__ import annotations

import enum

import torch

from .specs import Granularity, QuantSpec

__all__ = [
    "Layout", "natural_2d", "natural_2d_view", "natural_2d_dims", "natural_2d_shape", "from_natural_2d", "scale_shape",
    "shape_scale", "placement",
]


class Layout(enum.IntEnum):
    """How a tensor maps onto its natural (rows x columns) matrix.

    * ``DIM0``: rows are dim 0, everything else is flattened into columns (the paper's
      ``x.view(N, -1)``; convolutions and the public :func:`quantize`).
    * ``PENULTIMATE``: columns are the last dim, every other dim is flattened into rows (a matrix
      operand as consumed, batch dims folded into rows).
    * ``LAST``: the tensor is the transpose of its natural matrix: rows run along the last dim.
    * ``CHANNELS``: columns are dim 1, every other dim is flattened into rows (a convolution
      operand seen channels-last: a column is one channel at every sample and position). Never
      chosen by a site directly: :func:`placement` maps per-channel specs onto it.
    """

    DIM0 = 0
    PENULTIMATE = 1
    LAST = 2
    CHANNELS = 3


def _channels(shape: tuple) -> bool:
    return len(shape) >= 3


def _plain(layout: Layout, shape: tuple) -> Layout:
    """CHANNELS on a tensor with no spatial dims is the matrix layout with features last."""
    return Layout.PENULTIMATE if layout is Layout.CHANNELS and len(shape) < 3 else layout


def placement(spec: QuantSpec, layout: Layout, ndim: int) -> tuple[QuantSpec, Layout]:
    """The (spec, layout) a quantizer runs with: ``Granularity.CHANNEL`` becomes ``COLUMN`` --
    of the ``CHANNELS`` matrix for a convolution operand (3-D or more, rows at dim 0), of the
    layout's own matrix otherwise (a matrix's columns are its features already). Every other
    spec passes through unchanged, so the kernels and references know ``COLUMN`` only."""
    if spec.granularity is not Granularity.CHANNEL:
        return spec, layout
    column = spec.with_(granularity=Granularity.COLUMN)
    return column, (Layout.CHANNELS if layout is Layout.DIM0 and ndim >= 3 else layout)


def natural_2d(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """View (or copy) ``x`` as its natural rows x columns matrix."""
    layout = _plain(Layout(layout), x.shape)
    # explicit sizes, never -1: a reshape of 0 elements cannot infer a dim (a batch of 0)
    rows, cols = natural_2d_shape(x.shape, layout)
    if x.dim() >= 2 and layout is Layout.LAST:
        return x.transpose(-1, -2).reshape(rows, cols)
    if layout is Layout.CHANNELS and _channels(x.shape):
        return x.movedim(1, -1).reshape(rows, cols)
    return x.reshape(rows, cols)


def natural_2d_view(x: torch.Tensor, layout: Layout) -> torch.Tensor | None:
    """:func:`natural_2d` where it is a view of ``x`` (writing it writes ``x``); None where it
    would need a copy. Decided from shapes and strides alone, so it works on fake tensors."""
    t, split = _rows_first(x, layout)
    sizes, strides = list(t.shape), list(t.stride())
    if len(_merged(sizes[:split], strides[:split])) > 1 or len(_merged(sizes[split:], strides[split:])) > 1:
        return None  # decided before trying: a failed view would still be recorded by a tracer
    return t.view(*natural_2d_shape(x.shape, layout))


def natural_2d_dims(x: torch.Tensor, layout: Layout) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The dims, as (size, stride) outermost first, that the rows and the columns of ``x``'s
    natural matrix run over in ``x``'s memory: size-1 dims dropped, neighbours that flatten
    without a copy merged. Each is at most one dim exactly where the matrix is a strided view
    (:func:`natural_2d_view`); a kernel that unravels its row and column indices over these dims
    reads any ``x`` where it lies (broadcast, channels-last) with no copy."""
    t, split = _rows_first(x, layout)
    sizes, strides = list(t.shape), list(t.stride())
    return _merged(sizes[:split], strides[:split]), _merged(sizes[split:], strides[split:])


def _rows_first(x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, int]:
    """``x`` with its dims permuted (a view) so that the natural matrix's rows merge the dims
    before the returned split and its columns the dims from it on."""
    layout = _plain(Layout(layout), x.shape)
    t = x.transpose(-1, -2) if x.dim() >= 2 and layout is Layout.LAST else x
    if layout is Layout.CHANNELS and _channels(x.shape):
        t = x.movedim(1, -1)
    # rows merge t's leading dims, columns its trailing ones (DIM0: all but the first)
    return t, (1 if layout is Layout.DIM0 or t.dim() < 2 else t.dim() - 1)


def _merged(sizes: list, strides: list) -> list[tuple[int, int]]:
    """(size, stride) dims with size-1 dims dropped and each dim merged into the one before it
    where the two flatten without a copy (the outer stride is the inner stride times its size)."""
    dims: list[tuple[int, int]] = []
    for n, st in zip(sizes, strides):
        if n == 1:
            continue
        if dims and dims[-1][1] == st * n:
            dims[-1] = (dims[-1][0] * n, st)
        else:
            dims.append((n, st))
    return dims


def natural_2d_shape(shape: torch.Size | tuple[int, ...], layout: Layout) -> tuple[int, int]:
    """(rows, columns) of :func:`natural_2d` for a tensor of ``shape``, without a tensor."""
    layout = _plain(Layout(layout), tuple(shape))
    shape = tuple(shape)
    if len(shape) == 0:
        return (1, 1)
    if layout is Layout.CHANNELS and _channels(shape):
        rows = shape[0]
        for d in shape[2:]:
            rows *= d
        return (rows, shape[1])
    if len(shape) == 1 or layout is Layout.DIM0:
        rest = 1
        for d in shape[1:]:
            rest *= d
        return (shape[0], rest)
    lead = 1
    for d in shape[:-2]:
        lead *= d
    if layout is Layout.PENULTIMATE:
        return (lead * shape[-2], shape[-1])
    return (lead * shape[-1], shape[-2])


def from_natural_2d(m: torch.Tensor, like_shape: torch.Size, layout: Layout) -> torch.Tensor:
    """Inverse of :func:`natural_2d`: the natural matrix back in a tensor of ``like_shape``."""
    layout = _plain(Layout(layout), tuple(like_shape))
    if len(like_shape) >= 2 and layout is Layout.LAST:
        t_shape = (*like_shape[:-2], like_shape[-1], like_shape[-2])
        return m.reshape(t_shape).transpose(-1, -2)
    if layout is Layout.CHANNELS and _channels(tuple(like_shape)):
        return m.reshape(like_shape[0], *like_shape[2:], like_shape[1]).movedim(-1, 1)
    return m.reshape(like_shape)


def scale_shape(shape: torch.Size | tuple[int, ...], granularity: Granularity, layout: Layout) -> tuple[int, ...]:
    """Shape of the scale tensor, broadcastable against a tensor of ``shape`` (not for BLOCK)."""
    layout = _plain(Layout(layout), tuple(shape))
    shape = tuple(shape)
    nd = len(shape)
    if granularity is Granularity.TENSOR or nd == 0:
        return ()
    if nd == 1:
        return (shape[0],) if granularity is Granularity.ROW else (1,)
    if layout is Layout.CHANNELS and nd >= 3:
        if granularity is Granularity.ROW:  # one per (sample, position)
            return (shape[0], 1, *shape[2:])
        if granularity is Granularity.COLUMN:  # one per channel
            return (1, shape[1], *(1,) * (nd - 2))
        raise ValueError(f"scale_shape is not defined for {granularity} in the CHANNELS layout")
    if layout is Layout.DIM0:
        return (shape[0],) + (1,) * (nd - 1) if granularity is Granularity.ROW else (1,) + shape[1:]
    row_axis = nd - 2 if layout is Layout.PENULTIMATE else nd - 1
    if granularity is Granularity.ROW:
        # one scale per row: every dim except the column axis keeps its size
        col_axis = nd - 1 if layout is Layout.PENULTIMATE else nd - 2
        return tuple(1 if i == col_axis else s for i, s in enumerate(shape))
    if granularity is Granularity.COLUMN:
        col_axis = nd - 1 if layout is Layout.PENULTIMATE else nd - 2
        return tuple(s if i == col_axis else 1 for i, s in enumerate(shape))
    raise ValueError(f"scale_shape is not defined for {granularity} (row axis {row_axis})")


def shape_scale(t: torch.Tensor, x_shape: torch.Size, granularity: Granularity, layout: Layout) -> torch.Tensor:
    """Reshape one-per-group statistics (in grouped order) to :func:`scale_shape`."""
    layout = _plain(Layout(layout), tuple(x_shape))
    s_shape = scale_shape(x_shape, granularity, layout)
    t = t.reshape(-1)
    if layout is Layout.CHANNELS and len(x_shape) >= 3 and granularity is Granularity.ROW:
        return t.reshape(x_shape[0], *x_shape[2:]).unsqueeze(1)  # rows run over (sample, position)
    if granularity is Granularity.ROW and len(x_shape) >= 2 and layout is not Layout.DIM0:
        # rows of a LAST layout run along the last dim: build (..., rows) then move the unit dim
        col_axis = len(x_shape) - 1 if layout is Layout.PENULTIMATE else len(x_shape) - 2
        natural = [s for i, s in enumerate(s_shape) if i != col_axis]
        return t.reshape(natural).unsqueeze(col_axis)
    return t.reshape(s_shape)
