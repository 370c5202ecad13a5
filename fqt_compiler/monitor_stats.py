"""What a monitored graph measures: the bodies of the ``fqt::monitor_*`` ops (declared in ``ops.py``).

A monitored graph (``fqt_compiler.monitor``) gets these ops appended next to the quantizers and
GEMMs it watches (``passes/monitor_graph.py``); each returns a short float64 vector, one graph
output per probe, that the compiled step hands to the monitor. The functions here are the one
implementation: the ops run them eagerly, and where Inductor compiles a monitored graph they are
traced into it (``codegen/inline.py``), so that each probe's reductions fuse into a pass or two
over its tensors. Hence pure tensor code: no value read back to Python, no branch on one.
Elementwise work is float32 (differences of two gradient draws are exact enough in it); the
results are float64. A quantity that was not measured (no scales, no second backward) is -1:
every real one is >= 0, and a NaN would make the ops compare unequal to themselves.

* ``fqt::monitor_codes(x, codes, scale, zero_point, offset, spec)``: a quantizer with codes;
* ``fqt::monitor_fake(x, x_hat)``: a quantize-dequantize op (custom quantizers, block scales);
* ``fqt::monitor_error(y, y_ref)``: a forward GEMM against the same GEMM in high precision;
* ``fqt::monitor_gradient(g, g_redraw, g_exact, g_half_a, g_half_b, g_second, axis)``: a weight
  gradient's quantization and sampling variance (see :func:`gradient_stats`).
"""

from __future__ import annotations

import torch

from .grid import dequantize_ref
from .specs import QuantSpec, Scheme, Transform

__all__ = [
    "QUANTIZER_FIELDS", "ERROR_FIELDS", "GRADIENT_FIELDS", "quantizer_stats", "fake_quantizer_stats", "error_stats",
    "gradient_stats", "MISSING", "SAMPLE",
]

MISSING = -1.0  # a quantity not measured (see the module docstring)
SAMPLE = 1 << 17  # elements the shares are counted on (rows of dim 0 taken evenly); exact below
QUANTIZER_FIELDS = ("saturated", "zero", "clipped", "scale_min", "scale_max", "nonfinite")
ERROR_FIELDS = ("error_sq", "ref_sq", "nonfinite")
GRADIENT_FIELDS = ("own_var", "sampling_var", "total_var", "bias_dot", "dev_a_sq", "dev_b_sq", "exact_sq", "nonfinite",
                   "bias_rows_sum", "bias_rows_sq", "bias_rows")


def _vector(values: list, like: torch.Tensor) -> torch.Tensor:
    return torch.stack([v.double() if isinstance(v, torch.Tensor) else like.new_full((), v, dtype=torch.float64)
                        for v in values])


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float()


def _sq(t: torch.Tensor) -> torch.Tensor:
    # accumulated in float64: exact enough at any size, and Inductor's CPU code guards a float32
    # sum's length (for its chunked accumulator), which in a dynamic-shape graph would
    # specialize the compile to a range of batch sizes
    return t.square().sum(dtype=torch.float64) if t.numel() else t.new_zeros((), dtype=torch.float64)


def _nonfinite(*ts: torch.Tensor | None) -> torch.Tensor:
    counts = [(~torch.isfinite(t)).sum() for t in ts if t is not None and t.is_floating_point()]
    return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64)


def _share(count: torch.Tensor, total: torch.Tensor | int | torch.SymInt) -> torch.Tensor:
    if isinstance(total, (int, torch.SymInt)):  # a size (symbolic in a dynamic-shape graph: no guard on it)
        return count.double() / torch.sym_max(total, 1)
    return torch.where(total > 0, count.double() / total.clamp_min(1).double(), 0.0)


def _rows(like: torch.Tensor, *ts: torch.Tensor) -> list[torch.Tensor]:
    """Every k-th slice along dim 0 of ``ts`` (those sized like ``like`` there), k chosen so that
    about :data:`SAMPLE` elements remain: the shares of a large tensor are counted on an even
    sample of its rows (a share of 1% then has a standard error under 0.03%)."""
    n = like.shape[0] if like.dim() else 1
    numel = like.numel()
    if not isinstance(numel, int):
        # symbolic sizes (a dynamic-shape graph): every row, since a step computed from them
        # would specialize the compiled graph to the sizes that give the same step
        return list(ts)
    step = max(1, min(n, -(-numel // SAMPLE)))
    if step == 1:
        return list(ts)
    return [t[::step] if t.dim() and t.shape[0] == n else t for t in ts]


def _shares(x: torch.Tensor, x_hat: torch.Tensor, step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(share of nonzero inputs rounded to zero, share of inputs clipped).

    With the grid's ``step`` (a quantizer with codes), an input is clipped when its value moved
    by more than a step: rounding moves it by at most half a step (a full one, stochastic), so
    only the clamp at the grid's ends does more; a zero-on-grid grid whose end falls half a step
    short of the maximum is not clipping. Without (a quantize-dequantize op), it is clipped when
    it lies beyond the largest magnitude any output takes."""
    nonzero = x != 0
    zero = _share((nonzero & (x_hat == 0)).sum(), nonzero.sum())
    if step is not None:
        beyond = (x - x_hat).abs().nan_to_num(0.0, 0.0, 0.0) > step.abs() * (1 + 1e-3) + 1e-30
    else:
        top = x_hat.abs().nan_to_num(0.0, 0.0, 0.0).amax() if x_hat.numel() else x_hat.new_zeros(())
        beyond = x.abs().nan_to_num(0.0, 0.0, 0.0) > top * (1 + 1e-3) + 1e-30
    return zero, _share(beyond.sum(), x.numel())


def _scale_range(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = _f32(scale).abs()
    finite = torch.isfinite(s)
    lo = s.masked_fill(~finite, float("inf")).amin()
    hi = s.masked_fill(~finite, float("-inf")).amax()
    any_finite = finite.any()
    return torch.where(any_finite, lo, MISSING), torch.where(any_finite, hi, MISSING)


def quantizer_stats(x, codes, scale, zero_point, offset, spec: QuantSpec) -> torch.Tensor:
    """:data:`QUANTIZER_FIELDS` of one quantization: ``saturated`` is the share of codes on the
    grid's two ends; ``zero`` the share of nonzero inputs whose value came out zero; ``clipped``
    the share of inputs clipped (see :func:`_shares`); the scale range; ``nonfinite`` counts NaN
    / Inf in the input and the scales. Shares are counted on :func:`_rows`' sample. A transformed
    quantizer (BHQ) codes ``T x``: its shares are of the transformed values, whose zeros are the
    codes equal to the zero point."""
    xs, cs, ss, zs, os_ = _rows(codes, x, codes, scale, zero_point, offset)
    c = cs.float()
    if spec.format.is_float or spec.scheme is Scheme.SYMMETRIC:
        ends = c.abs() >= spec.qmax
    else:
        ends = (c <= spec.code_offset) | (c >= spec.code_offset + spec.levels)
    saturated = _share(ends.sum(), c.numel())
    if spec.transform is Transform.NONE:
        x_hat = dequantize_ref(cs, _f32(ss), _f32(zs), _f32(os_), torch.float32)
        # fp8: a step near the top of the range is qmax * scale / 2**(mantissa bits); one scale
        # times that bound is the furthest rounding moves a value
        step = _f32(ss) * (spec.qmax / 4 if spec.format.is_float else 1.0)
        zero, clipped = _shares(_f32(xs), x_hat, step)
    else:
        zero, clipped = _share((c == _f32(zs)).sum(), c.numel()), 0.0
    return _vector([saturated, zero, clipped, *_scale_range(scale), _nonfinite(x, scale)], x)


def fake_quantizer_stats(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """:data:`QUANTIZER_FIELDS` of a quantize-dequantize op, which has no codes: ``saturated`` is
    the share of outputs at the largest magnitude any output takes; no scales (``MISSING``)."""
    xs, hs = (_f32(t) for t in _rows(x, x, x_hat))
    h = hs.abs().nan_to_num(0.0, 0.0, 0.0)
    top = h.amax() if h.numel() else h.new_zeros(())
    saturated = torch.where(top > 0, _share((h >= top * (1 - 1e-6)).sum(), h.numel()), 0.0)
    zero, clipped = _shares(xs, hs)
    return _vector([saturated, zero, clipped, MISSING, MISSING, _nonfinite(x, x_hat)], x)


def error_stats(y: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    """:data:`ERROR_FIELDS`: ||y - y_ref||^2, ||y_ref||^2 and the NaN / Inf count of ``y``."""
    y32, r32 = _f32(y), _f32(y_ref)
    return _vector([_sq(y32 - r32), _sq(r32), _nonfinite(y)], y)


def gradient_stats(g, g_redraw, g_exact, g_half_a, g_half_b, g_second, axis: int = 0) -> torch.Tensor:
    """:data:`GRADIENT_FIELDS` of one weight gradient ``g`` (Theorem 2's quantities, one draw):

    * ``own_var`` = ||g - g_redraw||^2 / 2: ``g_redraw`` is the same GEMM with the site's own
      gradient quantizer drawn again on the same input, so this estimates the trace of the
      variance that quantizer adds to ``g``;
    * ``sampling_var`` = ||g_half_a - g_half_b||^2: the exact (unquantized ``grad_output``)
      gradient of each half of the batch; for independent halves E||a - b||^2 = tr Var[a + b],
      the minibatch's sampling variance;
    * ``total_var`` = ||g - g_second||^2 / 2: ``g_second`` comes from a second run of the whole
      backward, every gradient quantizer drawn afresh (``MISSING`` when there is none);
    * ``bias_dot``, ``dev_a_sq``, ``dev_b_sq``: <d_a, d_b>, ||d_a||^2, ||d_b||^2 for the two
      independent deviations d_a = g - g_exact, d_b = g_redraw - g_exact; an unbiased quantizer
      gives E<d_a, d_b> = ||E d||^2 = 0 (Theorem 1);
    * ``exact_sq`` = ||g_exact||^2, ``nonfinite``: NaN / Inf entries of ``g``;
    * ``bias_rows_*``: the sum, sum of squares and count of w_r = <d_a[r], d_b[r]> / (||d_a|| ||d_b||)
      over the gradient's slices ``r`` along ``axis``, the output channels: each depends on the
      rounding noise of its own ``grad_output`` channel only, so the w_r are independent, with
      mean 0 for an unbiased quantizer -- the samples of the monitor's bias test.
    """
    g32, r32, e32 = _f32(g), _f32(g_redraw), _f32(g_exact)
    sampling = _sq(_f32(g_half_a) - _f32(g_half_b)) if g_half_a is not None else MISSING
    total = _sq(g32 - _f32(g_second)) / 2 if g_second is not None else MISSING
    da, db = g32 - e32, r32 - e32
    a_sq, b_sq = _sq(da), _sq(db)
    norm = (a_sq.double() * b_sq.double()).sqrt().clamp_min(1e-300)
    rows = (da * db).movedim(axis, 0).reshape(da.shape[axis], -1).sum(1).double() / norm
    return _vector([_sq(g32 - r32) / 2, sampling, total, rows.sum() * norm, a_sq, b_sq, _sq(e32), _nonfinite(g),
                    rows.sum(), rows.square().sum(), float(rows.numel())], g)
