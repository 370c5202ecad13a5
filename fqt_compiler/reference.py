"""Pure-torch reference quantizers: the numerical source of truth.

Every quantizer works on a 2-D matrix in the operand's *natural* layout (rows x columns, see
``specs.py``); :class:`~fqt_compiler.layout.Layout` says how a tensor as a GEMM consumes it maps onto that matrix.
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

import contextlib
import contextvars

import torch

from .bhq import bhq_fake_quantize_2d
from .grid import QOperand, compute_dtype, dequantize_ref, draw_seed, grouped, hash_uniform, quantize_grouped, ungrouped
from .layout import Layout, from_natural_2d, natural_2d, placement, shape_scale
from .quantizers import run_custom
from .specs import Granularity, QuantSpec, Transform

__all__ = [
    "quantize", "quantize_ref", "fake_quantize_ref", "qmm_ref", "qbmm_ref", "check_qbmm", "dequantize_accumulator",
    "capture_quantizer_inputs", "observe_quantizer_input",
]


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
    spec, layout = placement(spec, layout, x.dim())
    dims = _groups_in_place(x, spec, layout) if noise is None else None
    if dims is not None:
        return _quantize_in_place(x, spec, dims, generator, seed)
    m = natural_2d(x, layout).to(compute_dtype(x))
    g = grouped(m, spec)
    codes, scale, zp, offset = quantize_grouped(g, spec, noise, generator, seed)
    codes = from_natural_2d(ungrouped(codes, m.shape, spec), x.shape, layout)
    if spec.granularity is Granularity.BLOCK:  # (rows, blocks) in the natural layout
        return (codes, *(t.reshape(m.shape[0], -1) for t in (scale, zp, offset)))
    return (codes, *(shape_scale(t, x.shape, spec.granularity, layout) for t in (scale, zp, offset)))


def _groups_in_place(x: torch.Tensor, spec: QuantSpec, layout: Layout) -> tuple[int, ...] | None:
    """The dims of ``x`` one scale group runs over where the grid is computed on ``x`` itself,
    in its own shape and memory order: per tensor, per dim-0 row or per column (one element
    position across the batch: the paper's per-column gradients of a convolution) of ``DIM0``,
    per dim-1 channel (``CHANNELS``) of a tensor of 3+ dims. The natural matrix of a
    channels-last activation is no view of it, and Inductor compiled the reshape into a gather
    per element (a per-sample quantizer ran at a tenth of memory speed; a per-column one at a
    thirtieth, its statistics a scalar loop). None: the natural-matrix path."""
    if x.dim() < 3 or spec.quantizer is not None or spec.transform is not Transform.NONE:
        return None
    every = tuple(range(x.dim()))
    if layout is Layout.DIM0 and spec.granularity is Granularity.TENSOR:
        return every
    if layout is Layout.DIM0 and spec.granularity is Granularity.ROW:
        return every[1:]
    if layout is Layout.DIM0 and spec.granularity is Granularity.COLUMN:
        return (0,)
    if layout is Layout.CHANNELS and spec.granularity is Granularity.COLUMN:
        return (0, *every[2:])
    return None


def _quantize_in_place(x: torch.Tensor, spec: QuantSpec, dims: tuple[int, ...], generator, seed):
    """:func:`quantize_ref` on ``x``'s own shape (see :func:`_groups_in_place`): the same
    statistics (max and min do not depend on order), the same arithmetic and the same noise
    (each element hashes its index in the natural-matrix path's grouped order), so the
    same codes as that path and the kernels."""
    v = x.to(compute_dtype(x))
    noise = None
    if spec.is_stochastic:
        seed = seed if seed is not None else draw_seed(x.device, generator)
        if spec.granularity is Granularity.COLUMN and dims == (0,):  # per column of x.view(N, -1), column-major
            noise = hash_uniform(seed, (*x.shape[1:], x.shape[0]), x.device).movedim(-1, 0)
        elif spec.granularity is Granularity.COLUMN:  # per channel: the channels-last matrix's columns, channel-major
            shape = (x.shape[1], x.shape[0], *x.shape[2:])
            noise = hash_uniform(seed, shape, x.device).movedim(0, 1)
        else:  # per tensor / per row: x's own row-major order
            noise = hash_uniform(seed, x.shape, x.device)
    codes, scale, zp, offset = quantize_grouped(v, spec, noise, generator, seed, dims)
    if spec.granularity is Granularity.TENSOR:
        scale, zp, offset = (t.reshape(()) for t in (scale, zp, offset))
    return codes, scale, zp, offset


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
    spec, layout = placement(spec, layout, x.dim())
    dims = _groups_in_place(x, spec, layout) if noise is None else None
    if dims is not None:
        codes, scale, zp, offset = _quantize_in_place(x, spec, dims, generator, seed)
        return dequantize_ref(codes, scale, zp, offset, compute_dtype(x)).to(x.dtype)
    m = natural_2d(x, layout).to(compute_dtype(x))
    if spec.quantizer is not None:
        out = run_custom(spec.quantizer, m, spec, generator=generator)
        return from_natural_2d(out.to(m.dtype), x.shape, layout).to(x.dtype)
    if spec.transform is Transform.BLOCK_HOUSEHOLDER:
        out = bhq_fake_quantize_2d(m, spec, noise=noise, generator=generator, seed=seed)
    else:
        g = grouped(m, spec)
        codes, scale, zp, offset = quantize_grouped(g, spec, noise, generator, seed)
        out = ungrouped(dequantize_ref(codes, scale, zp, offset, m.dtype), m.shape, spec)
    return from_natural_2d(out, x.shape, layout).to(x.dtype)


def quantize(x: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reference quantize-dequantize of one tensor (rows = dim 0 after flattening to 2-D;
    ``Granularity.CHANNEL`` on a tensor of 3 or more dims: one scale per dim-1 channel).

    This is the public entry point of the reference quantizers; it returns a tensor of ``x``'s
    shape and dtype whose values lie on ``spec``'s grid. With stochastic rounding the draws come
    from ``generator`` (default: torch's global generator, so ``torch.manual_seed`` reproduces).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    return fake_quantize_ref(x, spec, Layout.DIM0, generator=generator)


def qmm_ref(a: QOperand, b: QOperand, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Low-bit GEMM ``A_hat @ B_hat`` computed on the codes, dequantization in the epilogue.

    ``A_hat = (a.codes - a.zero_point) * a.scale + a.offset`` with per-tensor or per-row (M, 1)
    statistics and ``B_hat`` likewise with per-tensor or per-column (1, N) ones: the layouts a
    low-bit GEMM can realize. With T1 = sum_k (a - za)(b - zb), T2 = rowsum(a) - K za and
    T3 = colsum(b) - K zb (exact integers),

        out = (T1 * sa) * sb + (sa * ob) * T2 + (oa * sb) * T3 + K * oa * ob + bias

    in fp32, in this order (the kernels use the same order). Integer codes accumulate exactly;
    fp8 codes accumulate in fp32.
    """
    is_int = not a.codes.dtype.is_floating_point
    acc_dtype = torch.float64 if is_int else torch.float32  # fp64 holds every int32 sum exactly
    acc = a.codes.to(acc_dtype) @ b.codes.to(acc_dtype)
    return dequantize_accumulator(acc, a, b, bias, out_dtype)


def qbmm_ref(a: QOperand, b: QOperand, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Batched low-bit GEMM: :func:`qmm_ref` for each entry of (B, M, K) @ (B, K, N) codes.

    A's statistics are per tensor or broadcastable to (B, M, 1) -- constant along K, free to
    vary per batch entry and row -- and B's likewise to (B, 1, N): each entry of the batch is an
    independent GEMM with its own epilogue (attention's ``bmm`` of two activations)."""
    check_qbmm(a, b)
    return qmm_ref(a, b, None, out_dtype)


def check_qbmm(a: QOperand, b: QOperand) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` form a batched GEMM whose statistics are
    constant along its contraction (per tensor; A's (B or 1, M or 1, 1), B's (B or 1, 1, N or 1))."""
    ac, bc = a.codes, b.codes
    if ac.dim() != 3 or bc.dim() != 3 or ac.shape[0] != bc.shape[0] or ac.shape[2] != bc.shape[1]:
        raise ValueError(f"qbmm: codes {tuple(ac.shape)} @ {tuple(bc.shape)} do not form a batched (B, M, K) @ (B, K, N) GEMM")
    batch, m, _ = ac.shape
    n = bc.shape[2]
    for name, stats, allowed in (("A", a[1:], (batch, m, 1)), ("B", b[1:], (batch, 1, n))):
        for t in stats:
            if t is None or t.numel() == 1:
                continue
            shape = tuple(t.shape)
            if len(shape) != 3 or any(s not in (1, full) for s, full in zip(shape, allowed)):
                raise ValueError(
                    f"qbmm: {name}'s statistics have shape {shape}; expected per tensor or broadcastable to {allowed} "
                    "(constant along the contracted dim)"
                )


def _stat(t: torch.Tensor | None, acc: torch.Tensor, dtype: torch.dtype, axis: int) -> torch.Tensor:
    """A statistic broadcastable against ``acc`` along ``axis`` (-2: one per row, -1: one per
    column). A 2-D GEMM's arrive as vectors, (M, 1) or (1, N); a batched GEMM's keep their
    (B or 1, M or 1, N or 1) shape."""
    if t is None:
        return torch.zeros((), dtype=dtype, device=acc.device)
    t = t.to(dtype)
    if acc.dim() == 2 or t.numel() == 1:
        return t.reshape(-1, 1) if axis == -2 else t.reshape(1, -1)
    return t


def dequantize_accumulator(
    acc: torch.Tensor, a: QOperand, b: QOperand, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """The dequantization epilogue of :func:`qmm_ref` (and :func:`qbmm_ref`, batched), given
    ``acc = a.codes @ b.codes``.

    ``acc``'s dtype carries the integer terms: int64, or fp64 (exact for int8 codes), or fp32
    for fp8. Shared by the reference and the CPU ``torch._int_mm`` path, so they agree bit for bit.
    """
    a_codes, a_scale, a_zp, a_offset = a
    b_codes, b_scale, b_zp, b_offset = b
    k = a_codes.shape[-1]
    sa = _stat(a_scale, acc, torch.float32, -2)
    sb = _stat(b_scale, acc, torch.float32, -1)
    if a_zp is None and b_zp is None and a_offset is None and b_offset is None:
        out = (acc.to(torch.float32) * sa) * sb
    else:
        za = _stat(a_zp, acc, acc.dtype, -2)
        zb = _stat(b_zp, acc, acc.dtype, -1)
        oa = _stat(a_offset, acc, torch.float32, -2)
        ob = _stat(b_offset, acc, torch.float32, -1)
        rsa = a_codes.sum(-1, keepdim=True, dtype=acc.dtype)
        csb = b_codes.sum(-2, keepdim=True, dtype=acc.dtype)
        t1 = acc - za * csb - zb * rsa + k * za * zb
        t2 = (rsa - k * za).to(torch.float32)
        t3 = (csb - k * zb).to(torch.float32)
        out = (t1.to(torch.float32) * sa) * sb + (sa * ob) * t2 + (oa * sb) * t3 + (k * oa) * ob
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


_OBSERVER: contextvars.ContextVar[list | None] = contextvars.ContextVar("fqt_quantizer_inputs", default=None)


@contextlib.contextmanager
def capture_quantizer_inputs():
    """Within this block, every stochastic quantization run by the reference ops records
    ``(input, spec, layout)``: the gradient tensors the quantizers actually see (statistics).
    Only graphs executed with the reference ops report (``execution="reference"``)."""
    seen: list = []
    token = _OBSERVER.set(seen)
    try:
        yield seen
    finally:
        _OBSERVER.reset(token)


def observe_quantizer_input(x: torch.Tensor, spec: str, layout: int) -> None:
    """Record a stochastic quantizer's input inside :func:`capture_quantizer_inputs` (the reference ops call it)."""
    seen = _OBSERVER.get()
    if seen is not None and QuantSpec.from_key(spec).is_stochastic:
        seen.append((x.detach().clone(), QuantSpec.from_key(spec), Layout(layout)))
