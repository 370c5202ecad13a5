"""How a tensor maps onto the 2-D *natural* matrix every quantizer works on.

A GEMM operand is quantized in its natural layout (rows x columns, see ``specs.py``): rows are
samples or tokens, columns the features a row's scale runs over. :class:`Layout` says how a
tensor, as a GEMM consumes it, maps onto that matrix; the helpers here move tensors and their
scales between the two views. Shared by the reference quantizers, the kernels and the passes.
"""

from __future__ import annotations

import enum

import torch

from .specs import Granularity

__all__ = ["Layout", "natural_2d", "natural_2d_view", "natural_2d_shape", "from_natural_2d", "scale_shape", "shape_scale"]


class Layout(enum.IntEnum):
    """How a tensor maps onto its natural (rows x columns) matrix.

    * ``DIM0``: rows are dim 0, everything else is flattened into columns (the paper's
      ``x.view(N, -1)``; convolutions and the public :func:`quantize`).
    * ``PENULTIMATE``: columns are the last dim, every other dim is flattened into rows (a matrix
      operand as consumed, batch dims folded into rows).
    * ``LAST``: the tensor is the transpose of its natural matrix: rows run along the last dim.
    """

    DIM0 = 0
    PENULTIMATE = 1
    LAST = 2


def natural_2d(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """View (or copy) ``x`` as its natural rows x columns matrix."""
    # explicit sizes, never -1: a reshape of 0 elements cannot infer a dim (a batch of 0)
    rows, cols = natural_2d_shape(x.shape, layout)
    if x.dim() >= 2 and layout is Layout.LAST:
        return x.transpose(-1, -2).reshape(rows, cols)
    return x.reshape(rows, cols)


def natural_2d_view(x: torch.Tensor, layout: Layout) -> torch.Tensor | None:
    """:func:`natural_2d` where it is a view of ``x`` (writing it writes ``x``); None where it
    would need a copy. Decided from shapes and strides alone, so it works on fake tensors."""
    rows, cols = natural_2d_shape(x.shape, layout)
    t = x.transpose(-1, -2) if x.dim() >= 2 and layout is Layout.LAST else x
    try:
        return t.view(rows, cols)
    except RuntimeError:  # the strides admit no such view
        return None


def natural_2d_shape(shape: torch.Size | tuple[int, ...], layout: Layout) -> tuple[int, int]:
    """(rows, columns) of :func:`natural_2d` for a tensor of ``shape``, without a tensor."""
    shape = tuple(shape)
    if len(shape) == 0:
        return (1, 1)
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
    if len(like_shape) >= 2 and layout is Layout.LAST:
        t_shape = (*like_shape[:-2], like_shape[-1], like_shape[-2])
        return m.reshape(t_shape).transpose(-1, -2)
    return m.reshape(like_shape)


def scale_shape(shape: torch.Size | tuple[int, ...], granularity: Granularity, layout: Layout) -> tuple[int, ...]:
    """Shape of the scale tensor, broadcastable against a tensor of ``shape`` (not for BLOCK)."""
    shape = tuple(shape)
    nd = len(shape)
    if granularity is Granularity.TENSOR or nd == 0:
        return ()
    if nd == 1:
        return (shape[0],) if granularity is Granularity.ROW else (1,)
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
    s_shape = scale_shape(x_shape, granularity, layout)
    t = t.reshape(-1)
    if granularity is Granularity.ROW and len(x_shape) >= 2 and layout is not Layout.DIM0:
        # rows of a LAST layout run along the last dim: build (..., rows) then move the unit dim
        col_axis = len(x_shape) - 1 if layout is Layout.PENULTIMATE else len(x_shape) - 2
        natural = [s for i, s in enumerate(s_shape) if i != col_axis]
        return t.reshape(natural).unsqueeze(col_axis)
    return t.reshape(s_shape)
