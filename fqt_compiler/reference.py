"""Pure-torch reference quantizers: the numerical source of truth.

Every quantizer works on a 2-D matrix in the operand's *natural* layout (rows x columns, see
``specs.py``); :class:`Layout` says how a tensor as a GEMM consumes it maps onto that matrix.
All arithmetic is in fp32 (fp64 for fp64 inputs); codes are stored in the spec's code dtype and
dequantization is the affine map

    x_hat = (code - zero_point) * scale + offset

with ``zero_point`` an integer-valued float (so the paper's zero-on-grid weights dequantize 0 to
exactly 0) and ``offset`` a real-valued minimum (the paper's asymmetric activations). Scales are
*step sizes* (dequantization multipliers), so an all-zero or constant group gets ``scale = 0``
and is reproduced exactly, with no epsilon and no division by zero.

Formulas (B = 2**bits - 1, per group of elements sharing a scale):

* symmetric int: scale = max|x| / qmax, code = round(x / scale) in [-qmax, qmax]
* symmetric fp8: scale = max|x| / fp8_max, code = fp8(x / scale)
* asymmetric:    scale = (max - min) / B, level = round((x - min) / scale) in [0, B]
* zero-on-grid:  range widened to contain 0, qzero = floor(-min * B / (max - min)) (the paper's
  rule, clamped so both ends stay covered), scale = max(-min / qzero, max / (B - qzero)),
  x_hat = (level - qzero) * scale

Stochastic rounding is ``floor(v + u)`` with ``u ~ U[0, 1)`` (24-bit uniforms from a
counter-based hash of a seed drawn from torch's generator, see :func:`hash_uniform`), which is
unbiased (E[x_hat] = x up to the 2**-24 resolution of u) and reproducible under
``torch.manual_seed``. NaN or Inf in a group makes
that group's output NaN: it is never turned into finite numbers silently.
"""

from __future__ import annotations

import enum

import torch

from .specs import Granularity, QuantSpec, Rounding, Scheme, Transform

__all__ = [
    "Layout", "quantize", "quantize_ref", "dequantize_ref", "fake_quantize_ref",
    "natural_2d", "natural_2d_shape", "from_natural_2d", "scaled_values", "scale_shape", "shape_scale", "draw_seed", "hash_uniform", "qmm_ref", "qmm_epilogue",
]


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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp16/bf16 are upcast: scales and rounding must not be computed in 8-bit-mantissa math.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- group statistics
def _grouped(m: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
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


def _ungrouped(g: torch.Tensor, m_shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
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
_GOLDEN = 0x9E3779B9
_MIX = 0x45D9F3B
_MASK32 = 0xFFFFFFFF


def _rank() -> int:
    import torch.distributed as dist

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
    n = 1
    for d in shape:
        n *= d
    h = (torch.arange(n, device=device, dtype=torch.int64).reshape(shape) + seed.to(torch.int64) * _GOLDEN) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MIX) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MIX) & _MASK32
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
    v = torch.where(v.isnan(), float("nan"), v.clamp(-fmax, fmax))
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
    picked = torch.where(v.isnan(), v, picked)
    return picked.to(dtype)


def scaled_values(g: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pre-rounding value ``v`` of every element of ``g`` (in units of its group's step)
    and the group's scale, zero point (level index) and offset: rounding ``v`` gives the level.
    ``g``'s last dim runs over one scale group. Shared by the quantizers and the statistics."""
    if g.shape[-1] == 0:  # empty groups (a batch of 0 as the contracted dim): no statistics to take
        none = g.new_zeros((*g.shape[:-1], 1))
        return g, none, none, none
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    if spec.scheme is Scheme.SYMMETRIC:
        amax = g.abs().amax(dim=-1, keepdim=True)
        scale = amax / spec.qmax
        safe = torch.where(scale > 0, scale, 1)
        # NaN/Inf propagate: amax is NaN/Inf, so scale and every dequantized value are too.
        v = torch.where(scale.isfinite(), g / safe, g * scale)
        return v, scale, zero.expand_as(scale), zero.expand_as(scale)
    B = spec.levels
    mn = g.amin(dim=-1, keepdim=True)
    mx = g.amax(dim=-1, keepdim=True)
    if spec.scheme is Scheme.ASYMMETRIC:
        # (mx / B - mn / B) rather than (mx - mn) / B: cannot overflow for finite inputs.
        scale = mx / B - mn / B
        zp = zero.expand_as(scale)
        offset = mn
        safe = torch.where(scale > 0, scale, 1)
        v = (g - mn) / safe
    else:  # ZERO_ON_GRID: the range must contain 0 and 0 must be a level
        mn = mn.clamp(max=0)
        mx = mx.clamp(min=0)
        span = mx / B - mn / B
        # The paper's qzero = floor(-mn * B / (mx - mn)), kept in [1, B] when there are negatives
        # so the stretch never divides by zero (the reference code's NaN on all-positive
        # tensors); taking the larger of the two steps keeps both ends of the range covered.
        qzero = torch.floor(-mn / torch.where(span > 0, span, 1))
        qzero = torch.where(mn < 0, qzero.clamp(1, B), torch.zeros_like(qzero))
        down = torch.where(qzero > 0, -mn / torch.where(qzero > 0, qzero, 1), 0)
        up = torch.where(qzero < B, mx / torch.where(qzero < B, B - qzero, 1), 0)
        scale = torch.where(span.isfinite(), torch.maximum(down, up), span)  # NaN/Inf propagate
        zp = qzero
        offset = zero.expand_as(scale)
        safe = torch.where(scale > 0, scale, 1)
        v = g / safe + qzero
    # scale == 0: a constant group, reproduced exactly by the zero point / offset alone.
    # scale NaN/Inf: let it through so the dequantized group is NaN/Inf, never silently finite.
    v = torch.where(scale > 0, v, torch.where(scale.isfinite(), zp, scale))
    return v, scale, zp, offset


def _quantize_grouped(
    g: torch.Tensor,
    spec: QuantSpec,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``g`` whose last dim runs over one scale group. Returns codes, scale, zero_point,
    offset (the last three with a trailing size-1 dim)."""
    if spec.is_stochastic and noise is None:
        noise = hash_uniform(seed if seed is not None else draw_seed(g.device, generator), g.shape, g.device)
    v, scale, zp, offset = scaled_values(g, spec)
    if spec.scheme is Scheme.SYMMETRIC:
        if spec.format.is_float:
            codes = _fp8_round(v, spec, noise, generator)
        else:
            q = _round(v, spec, noise, generator).clamp(-spec.qmax, spec.qmax)
            codes = torch.nan_to_num(q).to(spec.code_dtype)
        return codes, scale, zp, offset
    q = _round(v, spec, noise, generator).clamp(0, spec.levels)
    codes = torch.nan_to_num(q + spec.code_offset).to(spec.code_dtype)
    return codes, scale, zp + spec.code_offset, offset


def dequantize_ref(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``(codes - zero_point) * scale + offset`` in the scale's precision, cast to ``dtype``."""
    c = codes.to(scale.dtype)
    return ((c - zero_point) * scale + offset).to(dtype)


def quantize_ref(
    x: torch.Tensor,
    spec: QuantSpec,
    layout: Layout = Layout.DIM0,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (no transform). Returns ``codes`` (x's shape, ``spec.code_dtype``) and
    ``scale``, ``zero_point``, ``offset`` broadcastable against ``x`` (see :func:`scale_shape`);
    for BLOCK granularity the statistics are (rows, blocks) of the natural matrix instead.

    Stochastic rounding draws :func:`hash_uniform` noise from ``seed`` (default: a seed drawn
    from ``generator`` / torch's generator); ``noise`` (uniform [0, 1) in the grouped order:
    row-major over the scale groups) replaces it outright.
    """
    if spec.transform is not Transform.NONE:
        raise ValueError("quantize_ref returns codes only for transform='none'; use fake_quantize_ref or bhq.bhq_quantize_ref")
    m = natural_2d(x, layout).to(_compute_dtype(x))
    g = _grouped(m, spec)
    codes, scale, zp, offset = _quantize_grouped(g, spec, noise, generator, seed)
    codes = from_natural_2d(_ungrouped(codes, m.shape, spec), x.shape, layout)
    if spec.granularity is Granularity.BLOCK:  # (rows, blocks) in the natural layout
        return (codes, *(t.reshape(m.shape[0], -1) for t in (scale, zp, offset)))
    return (codes, *(shape_scale(t, x.shape, spec.granularity, layout) for t in (scale, zp, offset)))


def fake_quantize_ref(
    x: torch.Tensor,
    spec: QuantSpec,
    layout: Layout = Layout.DIM0,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``spec`` (any granularity, any transform); same dtype as x."""
    if x.numel() == 0:
        return x.clone()
    m = natural_2d(x, layout).to(_compute_dtype(x))
    if spec.quantizer is not None:
        from .quantizers import run_custom

        out = run_custom(spec.quantizer, m, spec, generator=generator)
        return from_natural_2d(out.to(m.dtype), x.shape, layout).to(x.dtype)
    if spec.transform is Transform.BLOCK_HOUSEHOLDER:
        from .bhq import bhq_fake_quantize_2d

        out = bhq_fake_quantize_2d(m, spec, noise=noise, generator=generator, seed=seed)
    else:
        g = _grouped(m, spec)
        codes, scale, zp, offset = _quantize_grouped(g, spec, noise, generator, seed)
        out = _ungrouped(dequantize_ref(codes, scale, zp, offset, m.dtype), m.shape, spec)
    return from_natural_2d(out, x.shape, layout).to(x.dtype)


def quantize(x: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reference quantize-dequantize of one tensor (rows = dim 0 after flattening to 2-D).

    This is the public entry point of the reference quantizers; it returns a tensor of ``x``'s
    shape and dtype whose values lie on ``spec``'s grid. With stochastic rounding the draws come
    from ``generator`` (default: torch's global generator, so ``torch.manual_seed`` reproduces).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    return fake_quantize_ref(x, spec, Layout.DIM0, generator=generator)


def qmm_ref(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    a_zp: torch.Tensor | None,
    a_offset: torch.Tensor | None,
    b_codes: torch.Tensor,
    b_scale: torch.Tensor,
    b_zp: torch.Tensor | None,
    b_offset: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Low-bit GEMM ``A_hat @ B_hat`` computed on the codes, dequantization in the epilogue.

    ``A_hat = (a_codes - a_zp) * a_scale + a_offset`` with per-tensor or per-row (M, 1)
    statistics and ``B_hat`` likewise with per-tensor or per-column (1, N) ones: the layouts a
    low-bit GEMM can realize. With T1 = sum_k (a - za)(b - zb), T2 = rowsum(a) - K za and
    T3 = colsum(b) - K zb (exact integers),

        out = (T1 * sa) * sb + (sa * ob) * T2 + (oa * sb) * T3 + K * oa * ob + bias

    in fp32, in this order (the kernels use the same order). Integer codes accumulate exactly;
    fp8 codes accumulate in fp32.
    """
    is_int = not a_codes.dtype.is_floating_point
    acc_dtype = torch.float64 if is_int else torch.float32  # fp64 holds every int32 sum exactly
    acc = a_codes.to(acc_dtype) @ b_codes.to(acc_dtype)
    return qmm_epilogue(acc, a_codes, a_scale, a_zp, a_offset, b_codes, b_scale, b_zp, b_offset, bias, out_dtype)


def qmm_epilogue(
    acc: torch.Tensor,
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    a_zp: torch.Tensor | None,
    a_offset: torch.Tensor | None,
    b_codes: torch.Tensor,
    b_scale: torch.Tensor,
    b_zp: torch.Tensor | None,
    b_offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The dequantization epilogue of :func:`qmm_ref`, given ``acc = a_codes @ b_codes``.

    ``acc``'s dtype carries the integer terms: int64, or fp64 (exact for int8 codes), or fp32
    for fp8. Shared by the reference and the CPU ``torch._int_mm`` path, so they agree bit for bit.
    """
    k = a_codes.shape[1]
    sa = a_scale.to(torch.float32).reshape(-1, 1)
    sb = b_scale.to(torch.float32).reshape(1, -1)
    if a_zp is None and b_zp is None and a_offset is None and b_offset is None:
        out = (acc.to(torch.float32) * sa) * sb
    else:
        zero = torch.zeros((), device=acc.device)
        za = (a_zp if a_zp is not None else zero).to(acc.dtype).reshape(-1, 1)
        zb = (b_zp if b_zp is not None else zero).to(acc.dtype).reshape(1, -1)
        oa = (a_offset if a_offset is not None else zero).to(torch.float32).reshape(-1, 1)
        ob = (b_offset if b_offset is not None else zero).to(torch.float32).reshape(1, -1)
        rsa = a_codes.sum(1, keepdim=True, dtype=acc.dtype)
        csb = b_codes.sum(0, keepdim=True, dtype=acc.dtype)
        t1 = acc - za * csb - zb * rsa + k * za * zb
        t2 = (rsa - k * za).to(torch.float32)
        t3 = (csb - k * zb).to(torch.float32)
        out = (t1.to(torch.float32) * sa) * sb + (sa * ob) * t2 + (oa * sb) * t3 + (k * oa) * ob
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)
