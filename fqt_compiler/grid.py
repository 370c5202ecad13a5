"""The quantization grid: scales, zero points, rounding and codes of one grouped matrix.

The arithmetic every reference quantizer shares (``reference.py`` for the plain granularities,
``bhq.py`` after its transform); see ``reference.py`` for the formulas. A *grouped* matrix has
the elements sharing one scale along its last dim (:func:`grouped`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from .specs import Granularity, QuantSpec, Rounding, Scheme

__all__ = [
    "QOperand", "compute_dtype", "grouped", "ungrouped", "draw_seed", "hash_uniform", "hash_uniform_ref",
    "HASH_GOLDEN", "HASH_MIX", "MASK32", "scaled_values", "quantize_grouped",
    "dequantize_ref",
]



class QOperand(NamedTuple):
    """One low-bit GEMM operand: codes on a grid, ``x_hat = (codes - zero_point) * scale + offset``.

    ``zero_point`` and ``offset`` are None on symmetric grids. The statistics are per tensor, or
    constant along the contraction: per row (M, 1) of a left operand, per column (1, N) of a
    right one -- the layouts a low-bit GEMM applies in its epilogue."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    offset: torch.Tensor | None = None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp16/bf16 are upcast: scales and rounding must not be computed in 8-bit-mantissa math.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- group statistics
def grouped(m: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape the natural matrix so that dim -1 runs over the elements sharing one scale."""
    g = spec.granularity
    if g is Granularity.TENSOR:
        return m.reshape(1, -1)
    if g is Granularity.ROW:
        return m
    if g is Granularity.COLUMN:
        return m.t()
    # BLOCK: pad the ragged last block by repeating a row element so that padding never widens
    # the block's range (the pad is sliced off again after quantizing).
    n = spec.block_size
    rows, cols = m.shape
    pad = (-cols) % n
    if pad:
        m = torch.cat([m, m[:, :1].expand(rows, pad)], dim=1)
    return m.reshape(rows, -1, n)


def ungrouped(g: torch.Tensor, m_shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    gran = spec.granularity
    if gran is Granularity.TENSOR or gran is Granularity.ROW:
        return g.reshape(m_shape)
    if gran is Granularity.COLUMN:
        return g.t()
    return g.reshape(m_shape[0], -1)[:, : m_shape[1]]


# Stochastic rounding noise: a counter-based hash of (seed, element index), Mueller's 32-bit
# integer finaliser, giving 24-bit uniforms like torch.rand. The same integer arithmetic runs in
# the reference, in the Triton kernels and in Inductor-generated code, so all three round
# identically given one seed; the seed itself is drawn from torch's generator, so
# torch.manual_seed reproduces a run. (int64 arithmetic with 32-bit masks: no product ever
# exceeds 2**63, so no backend meets signed overflow.)
HASH_GOLDEN = 0x9E3779B9
HASH_MIX = 0x45D9F3B
MASK32 = 0xFFFFFFFF


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def draw_seed(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A stochastic-rounding seed from torch's generator: a 1-element int64 tensor on
    ``device`` (drawn there, so no host synchronisation).

    Under torch.distributed the rank is folded in: ranks seeded alike (the usual way to get
    identical initial weights) still round their gradients with independent noise, so averaging
    across ranks averages the quantization noise away; each rank stays reproducible."""
    if generator is None:  # no generator argument: traced graphs then carry plain aten.randint
        seed = torch.randint(0, 2**31 - 1, (1,), device=device)
    else:
        seed = torch.randint(0, 2**31 - 1, (1,), device=device, generator=generator)
    rank = _rank()
    if rank:
        seed = (seed + rank * 0x61C88647) % (2**31 - 1)
    return seed


def hash_uniform(seed: torch.Tensor, shape: tuple[int, ...] | torch.Size, device: torch.device | str) -> torch.Tensor:
    """U[0, 1) noise for every element of ``shape`` (row-major index), as fp32 multiples of 2**-24."""
    # One op in traced graphs (symbolic sizes included), so that compiled code traces the hash
    # once per element: written out in aten ops, each round's ``h ^ (h >> 16)`` reads h twice,
    # and Inductor inlines a value once per read, so the element loop's expression doubled with
    # every round. fqt lowers the op into Inductor (``lowerings.py``).
    return torch.ops.fqt.hash_uniform(seed, list(shape), torch.device(device))


def hash_uniform_ref(seed: torch.Tensor, shape: list[int], device: torch.device) -> torch.Tensor:
    """The body of ``fqt::hash_uniform`` (:func:`hash_uniform` on static sizes)."""
    n = 1
    for d in shape:
        n *= d
    index = torch.arange(n, device=device, dtype=torch.int64).reshape(shape)
    return _hashed(seed.to(torch.int64).reshape(()), index)


def _hashed(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    h = (index + seed * HASH_GOLDEN) & MASK32
    h = h ^ (h >> 16)
    h = (h * HASH_MIX) & MASK32
    h = h ^ (h >> 16)
    h = (h * HASH_MIX) & MASK32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def _uniform(v: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return hash_uniform(draw_seed(v.device, generator), v.shape, v.device)


def _round(v: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    if spec.rounding is Rounding.NEAREST:
        return torch.round(v)
    if noise is None:
        noise = _uniform(v, generator)
    return torch.floor(v + noise.to(v.dtype))


def _fp8_round(v: torch.Tensor, spec: QuantSpec, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """Round to the fp8 grid (v already scaled into [-fp8_max, fp8_max]); returns fp8 codes."""
    dtype = spec.code_dtype
    fmax = spec.qmax
    # one canonical (positive) NaN code, whatever the sign bit of the NaN that reached here
    v = torch.where(v != v, float("nan"), v.clamp(-fmax, fmax))  # self-comparison: vectorized isnan
    nearest = v.to(dtype)
    if spec.rounding is Rounding.NEAREST:
        return nearest
    # Stochastic: find the two fp8 neighbours lo <= v <= hi and pick hi with probability
    # (v - lo) / (hi - lo). Neighbours come from stepping the magnitude bits by one.
    near_f = nearest.to(v.dtype)
    bits = nearest.view(torch.uint8).to(torch.int16)
    sign = bits & 0x80
    mag = bits & 0x7F
    away = near_f.abs() < v.abs()  # v lies further from zero than the nearest value
    other_mag = torch.where(away, mag + 1, (mag - 1).clamp_min(0))
    other = (sign | other_mag).to(torch.uint8).view(dtype).to(v.dtype)
    other = torch.where(other.isfinite(), other, near_f).clamp(-fmax, fmax)
    lo = torch.minimum(near_f, other)
    hi = torch.maximum(near_f, other)
    width = hi - lo
    if noise is None:
        noise = _uniform(v, generator)
    p_hi = torch.where(width > 0, (v - lo) / torch.where(width > 0, width, 1), 0)
    picked = torch.where(noise.to(v.dtype) < p_hi, hi, lo)
    picked = torch.where(v != v, v, picked)
    return picked.to(dtype)


class _GroupGrid(NamedTuple):
    """One scale group's grid: the statistics of :func:`quantize_grouped` (size-1 dims where
    the group runs)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    offset: torch.Tensor  # the asymmetric grid's minimum; 0 otherwise


def _group_grid(g: torch.Tensor, spec: QuantSpec, dims: tuple[int, ...] = (-1,)) -> _GroupGrid | None:
    """The grid of every scale group of ``g`` (its ``dims`` run over one group): the scale, zero
    point (level index) and offset. None for empty groups
    (a batch of 0 as the contracted dim)."""
    group = 1
    for d in dims:
        group *= g.shape[d]
    if group == 0:
        return None
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    if spec.scheme is Scheme.SYMMETRIC:
        amax = g.abs().amax(dim=dims, keepdim=True)
        # times the constant's reciprocal, not a division by it: CUDA's eager division by a
        # Python scalar and Inductor's division by a constant both multiply by the
        # reciprocal, the CPU's divides; written out, every device and kernel rounds alike
        scale = amax * (1.0 / spec.qmax)
        return _GroupGrid(scale, zero.expand_as(scale), zero.expand_as(scale))
    B = spec.levels
    mn = g.amin(dim=dims, keepdim=True)
    mx = g.amax(dim=dims, keepdim=True)
    if spec.scheme is Scheme.ASYMMETRIC:
        # (mx - mn) / B from halves: cannot overflow for finite inputs, and halving is exact,
        # so a compiler's fused multiply-add of the first half gives the same bits
        scale = (mx * 0.5 - mn * 0.5) * (2.0 / B)
        return _GroupGrid(scale, zero.expand_as(scale), mn)
    # ZERO_ON_GRID: the range must contain 0 and 0 must be a level
    mn = mn.clamp(max=0)
    mx = mx.clamp(min=0)
    span = (mx * 0.5 - mn * 0.5) * (2.0 / B)
    # The paper's qzero = floor(-mn * B / (mx - mn)), kept in [1, B] when there are negatives
    # so the stretch never divides by zero (the reference code's NaN on all-positive
    # tensors); taking the larger of the two steps keeps both ends of the range covered.
    qzero = torch.floor(-mn / torch.where(span > 0, span, 1))
    qzero = torch.where(mn < 0, qzero.clamp(1, B), torch.zeros_like(qzero))
    down = torch.where(qzero > 0, -mn / torch.where(qzero > 0, qzero, 1), 0)
    up = torch.where(qzero < B, mx / torch.where(qzero < B, B - qzero, 1), 0)
    scale = torch.where(span.isfinite(), torch.maximum(down, up), span)  # NaN/Inf propagate
    return _GroupGrid(scale, qzero, zero.expand_as(scale))


def _grid_values(g: torch.Tensor, spec: QuantSpec, grid: _GroupGrid) -> torch.Tensor:
    """The pre-rounding value of every element of ``g`` in units of its group's step: rounding
    it gives the level.

    scale > 0: ``g`` in steps (an infinite scale gives NaN/Inf values, so the dequantized group
    is NaN/Inf, never silently finite). scale == 0: a constant group, reproduced exactly by the
    zero point / offset alone. scale NaN (a NaN in the group): NaN."""
    # Compiled code inlines this expression, and every test of the scale in it, into the
    # quantizer's element loop (twice, see quantize_grouped), so it is kept to the fewest
    # operations: the symmetric and asymmetric scales are never negative and are +0 exactly
    # when the group is constant, so the scale itself is the value of every other case.
    scale = grid.scale
    if spec.scheme is Scheme.SYMMETRIC:
        # g / 0 is g * inf for every g (signed infinities, NaN for zeros)
        return torch.where(scale > 0, g / torch.where(scale == math.inf, 0, scale), scale)
    if spec.scheme is Scheme.ASYMMETRIC:
        return torch.where(scale > 0, (g - grid.offset) / scale, scale)
    return torch.where(scale > 0, g / scale + grid.zero_point, torch.where(scale == scale, grid.zero_point, scale))


def scaled_values(
    g: torch.Tensor, spec: QuantSpec, dims: tuple[int, ...] = (-1,)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pre-rounding value ``v`` of every element of ``g`` (in units of its group's step)
    and the group's scale, zero point (level index) and offset: rounding ``v`` gives the level.
    ``g``'s ``dims`` (by default its last) run over one scale group; the statistics keep them
    as size-1 dims. Shared by the quantizers and the statistics."""
    grid = _group_grid(g, spec, dims)
    if grid is None:
        none = g.new_zeros(tuple(1 if i in {d % g.dim() for d in dims} else n for i, n in enumerate(g.shape)))
        return g, none, none, none
    return _grid_values(g, spec, grid), grid.scale, grid.zero_point, grid.offset


def _nan_to_zero(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``q`` (the rounded, clamped levels of ``v``) with 0 where ``v`` is NaN: ``nan_to_num``'s
    result, since rounding, noise and clamping keep a value NaN exactly where ``v`` is.
    ``nan_to_num``'s ``isnan`` is not vectorized by Inductor's CPU code, hence a comparison;
    ``v`` must be a node of its own (see :func:`quantize_grouped`), and is read once: compiled
    code inlines ``v`` once per read (``v == v`` would inline it twice)."""
    return torch.where(v.abs() >= 0, q, 0.0)


def quantize_grouped(
    g: torch.Tensor,
    spec: QuantSpec,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
    seed: torch.Tensor | None = None,
    dims: tuple[int, ...] = (-1,),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``g`` whose ``dims`` (by default its last) run over one scale group. Returns
    codes, scale, zero_point, offset (the last three with those dims of size 1). The noise of
    stochastic rounding is drawn in ``g``'s row-major order unless ``noise`` is given."""
    if spec.is_stochastic and noise is None:
        noise = hash_uniform(seed if seed is not None else draw_seed(g.device, generator), g.shape, g.device)
    grid = _group_grid(g, spec, dims)
    if grid is None:  # empty groups: nothing to round
        v, scale, zp, offset = scaled_values(g, spec, dims)
        witness = v
    else:
        v, scale, zp, offset = _grid_values(g, spec, grid), grid.scale, grid.zero_point, grid.offset
        # The NaN test reads a second, separately traced copy of v (the statistics shared):
        # Inductor stores a value two ops read (fqt compiles with realize_reads_threshold=1,
        # so that a quantizer's input is stored once for its two passes), and a shared v -- or
        # the levels -- was written to an fp32 buffer and read back per element. The two
        # copies compile to one expression (the kernel's common-subexpression elimination),
        # and the codes store fuses into the rounding.
        witness = _grid_values(g, spec, grid)
    if spec.scheme is Scheme.SYMMETRIC and spec.format.is_float:
        return _fp8_round(v, spec, noise, generator), scale, zp, offset
    if spec.scheme is Scheme.SYMMETRIC:
        q = _round(v, spec, noise, generator).clamp(-spec.qmax, spec.qmax)
        return _nan_to_zero(q, witness).to(spec.code_dtype), scale, zp, offset
    q = _round(v, spec, noise, generator).clamp(0, spec.levels)
    codes = _nan_to_zero(q + spec.code_offset, witness).to(spec.code_dtype)
    return codes, scale, zp + spec.code_offset, offset


def dequantize_ref(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``(codes - zero_point) * scale + offset`` in the scale's precision, cast to ``dtype``."""
    c = codes.to(scale.dtype)
    return ((c - zero_point) * scale + offset).to(dtype)
