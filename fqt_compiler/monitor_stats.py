"""What a monitored graph measures: the bodies of the ``fqt::monitor_*`` ops (declared in ``ops.py``).

A monitored graph (``fqt_compiler.monitor``) gets these ops appended next to the quantizers and
GEMMs it watches (``passes/monitor_graph.py``); each returns a short float64 vector, one graph
output per probe, that the compiled step hands to the monitor. They run on monitored steps only
(the other steps run a graph without them), so they are plain eager code: a handful of
reductions each, in float64 so that sums of squares of large gradients neither overflow nor
lose the small differences the variance estimates are made of. A quantity that was not measured
(no scales, no second backward) is -1: every real one is >= 0, and a NaN would make the ops
compare unequal to themselves.

* ``fqt::monitor_codes(x, codes, scale, zero_point, offset, spec)``: a quantizer with codes;
* ``fqt::monitor_fake(x, x_hat)``: a quantize-dequantize op (custom quantizers, block scales);
* ``fqt::monitor_error(y, y_ref)``: a forward GEMM against the same GEMM in high precision;
* ``fqt::monitor_gradient(g, g_redraw, g_exact, g_half_a, g_half_b, g_second, axis)``: a weight
  gradient's quantization and sampling variance (see :func:`gradient_stats`).
"""

from __future__ import annotations

import math

import torch

from .grid import dequantize_ref
from .specs import QuantSpec, Scheme, Transform

__all__ = [
    "QUANTIZER_FIELDS", "ERROR_FIELDS", "GRADIENT_FIELDS", "quantizer_stats", "fake_quantizer_stats", "error_stats",
    "gradient_stats", "stats_vector", "MISSING",
]

MISSING = -1.0  # a quantity not measured (see the module docstring)
QUANTIZER_FIELDS = ("saturated", "zero", "clipped", "scale_min", "scale_max", "nonfinite")
ERROR_FIELDS = ("error_sq", "ref_sq", "nonfinite")
GRADIENT_FIELDS = ("own_var", "sampling_var", "total_var", "bias_dot", "dev_a_sq", "dev_b_sq", "exact_sq", "nonfinite",
                   "bias_rows_sum", "bias_rows_sq", "bias_rows")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _nonfinite(*ts: torch.Tensor | None) -> float:
    return float(sum(int((~torch.isfinite(t)).sum()) for t in ts if t is not None and t.is_floating_point()))


def _shares(x: torch.Tensor, x_hat: torch.Tensor, step: torch.Tensor | None = None) -> tuple[float, float]:
    """(share of nonzero inputs rounded to zero, share of inputs clipped).

    With the grid's ``step`` (a quantizer with codes), an input is clipped when its value moved
    by more than a step: rounding moves it by at most half a step (a full one, stochastic), so
    only the clamp at the grid's ends does more; a zero-on-grid grid whose end falls half a step
    short of the maximum is not clipping. Without (a quantize-dequantize op), it is clipped when
    it lies beyond the largest magnitude any output takes."""
    x, x_hat = _f64(x), _f64(x_hat)
    nonzero = x != 0
    n_nonzero = int(nonzero.sum())
    zero = float((nonzero & (x_hat == 0)).sum()) / n_nonzero if n_nonzero else 0.0
    moved = (x - x_hat).abs().nan_to_num(0.0, 0.0, 0.0)
    if step is not None:
        beyond = moved > _f64(step).abs() * (1 + 1e-3) + 1e-30
    else:
        top = float(x_hat.abs().nan_to_num(0.0, 0.0, 0.0).max()) if x_hat.numel() else 0.0
        beyond = x.abs().nan_to_num(0.0, 0.0, 0.0) > top * (1 + 1e-3) + 1e-30
    return zero, float(beyond.sum()) / max(x.numel(), 1)


def quantizer_stats(x, codes, scale, zero_point, offset, spec: QuantSpec) -> list[float]:
    """:data:`QUANTIZER_FIELDS` of one quantization: ``saturated`` is the share of codes on the
    grid's two ends; ``zero`` the share of nonzero inputs whose value came out zero; ``clipped``
    the share of inputs beyond the largest dequantized value; ``nonfinite`` counts NaN / Inf in
    the input and the scales. A transformed quantizer (BHQ) codes ``T x``: its shares are of the
    transformed values, whose zeros are the codes equal to the zero point."""
    c = _f64(codes)
    if spec.format.is_float:
        saturated = float((c.abs() >= spec.qmax).sum())
    elif spec.scheme is Scheme.SYMMETRIC:
        saturated = float((c.abs() >= spec.qmax).sum())
    else:
        lo = spec.code_offset
        saturated = float(((c <= lo) | (c >= lo + spec.levels)).sum())
    saturated /= max(c.numel(), 1)
    if spec.transform is Transform.NONE:
        x_hat = dequantize_ref(codes, _f64(scale), _f64(zero_point), _f64(offset), torch.float64)
        # fp8: a step near the top of the range is qmax * scale / 2**(mantissa bits); one scale
        # times that bound is the furthest rounding moves a value
        step = _f64(scale) * (spec.qmax / 4 if spec.format.is_float else 1.0)
        zero, clipped = _shares(x, x_hat, step)
    else:
        zero = float((c == _f64(zero_point)).sum()) / max(c.numel(), 1)
        clipped = 0.0
    s = _f64(scale).abs()
    finite = s[torch.isfinite(s)]
    lo_s, hi_s = (float(finite.min()), float(finite.max())) if finite.numel() else (MISSING, MISSING)
    return [saturated, zero, clipped, lo_s, hi_s, _nonfinite(x, scale)]


def fake_quantizer_stats(x: torch.Tensor, x_hat: torch.Tensor) -> list[float]:
    """:data:`QUANTIZER_FIELDS` of a quantize-dequantize op, which has no codes: ``saturated`` is
    the share of outputs at the largest magnitude any output takes; no scales (``MISSING``)."""
    h = _f64(x_hat).abs().nan_to_num(0.0, 0.0, 0.0)
    top = float(h.max()) if h.numel() else 0.0
    saturated = float((h >= top * (1 - 1e-6)).sum()) / max(h.numel(), 1) if top > 0 else 0.0
    zero, clipped = _shares(x, x_hat)
    return [saturated, zero, clipped, MISSING, MISSING, _nonfinite(x, x_hat)]


def error_stats(y: torch.Tensor, y_ref: torch.Tensor) -> list[float]:
    """:data:`ERROR_FIELDS`: ||y - y_ref||^2, ||y_ref||^2 and the NaN / Inf count of ``y``."""
    y64, r64 = _f64(y), _f64(y_ref)
    return [float(((y64 - r64) ** 2).sum()), float((r64**2).sum()), _nonfinite(y)]


def gradient_stats(g, g_redraw, g_exact, g_half_a, g_half_b, g_second, axis: int = 0) -> list[float]:
    """:data:`GRADIENT_FIELDS` of one weight gradient ``g`` (Theorem 2's quantities, one draw):

    * ``own_var`` = ||g - g_redraw||^2 / 2: ``g_redraw`` is the same GEMM with the site's own
      gradient quantizer drawn again on the same input, so this estimates the trace of the
      variance that quantizer adds to ``g``;
    * ``sampling_var`` = ||g_half_a - g_half_b||^2: the exact (unquantized ``grad_output``)
      gradient of each half of the batch; for independent halves E||a - b||^2 = tr Var[a + b],
      the minibatch's sampling variance;
    * ``total_var`` = ||g - g_second||^2 / 2: ``g_second`` comes from a second run of the whole
      backward, every gradient quantizer drawn afresh (NaN when there is none);
    * ``bias_dot``, ``dev_a_sq``, ``dev_b_sq``: <d_a, d_b>, ||d_a||^2, ||d_b||^2 for the two
      independent deviations d_a = g - g_exact, d_b = g_redraw - g_exact; an unbiased quantizer
      gives E<d_a, d_b> = ||E d||^2 = 0 (Theorem 1);
    * ``exact_sq`` = ||g_exact||^2, ``nonfinite``: NaN / Inf entries of ``g``;
    * ``bias_rows_*``: the sum, sum of squares and count of w_r = <d_a[r], d_b[r]> / (||d_a|| ||d_b||)
      over the gradient's slices ``r`` along ``axis``, the output channels: each depends on the
      rounding noise of its own ``grad_output`` channel only, so the w_r are independent, with
      mean 0 for an unbiased quantizer -- the samples of the monitor's bias test.
    """
    g64, r64, e64 = _f64(g), _f64(g_redraw), _f64(g_exact)
    own = float(((g64 - r64) ** 2).sum()) / 2
    sampling = float(((_f64(g_half_a) - _f64(g_half_b)) ** 2).sum()) if g_half_a is not None else MISSING
    total = float(((g64 - _f64(g_second)) ** 2).sum()) / 2 if g_second is not None else MISSING
    da, db = g64 - e64, r64 - e64
    a_sq, b_sq = float((da**2).sum()), float((db**2).sum())
    rows = (da * db).movedim(axis, 0).reshape(da.shape[axis], -1).sum(1) / max(math.sqrt(a_sq * b_sq), 1e-300)
    return [own, sampling, total, float((da * db).sum()), a_sq, b_sq, float((e64**2).sum()), _nonfinite(g),
            float(rows.sum()), float((rows**2).sum()), float(rows.numel())]


def stats_vector(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A probe's values as the float64 vector its op returns, on ``like``'s device."""
    return torch.tensor(values, dtype=torch.float64, device=like.device)
