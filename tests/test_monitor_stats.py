"""The monitor's probe bodies (``monitor_stats``) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fqt_compiler import QuantSpec
from fqt_compiler.layout import Layout
from fqt_compiler.monitor_stats import (
    GRADIENT_FIELDS, MISSING, QUANTIZER_FIELDS, error_stats, fake_quantizer_stats, gradient_stats, quantizer_stats,
)
from fqt_compiler.reference import quantize_ref


def _q(x, spec, layout=Layout.PENULTIMATE):
    return dict(zip(QUANTIZER_FIELDS, quantizer_stats(x, *quantize_ref(x, spec, layout), spec).tolist()))


def test_min_max_quantizers_never_clip():
    x = torch.randn(64, 32)
    for spec in (QuantSpec(bits=4, granularity="row"), QuantSpec(bits=8, scheme="asym", format="int"),
                 QuantSpec(bits=3, scheme="zog", granularity="tensor"), QuantSpec(format="fp8_e4m3", granularity="row"),
                 QuantSpec(bits=4, rounding="stochastic", granularity="column")):
        s = _q(x, spec)
        assert s["clipped"] == 0, spec
        assert 0 < s["saturated"] <= 0.1, spec  # each group's extreme sits on the grid's end
        assert s["nonfinite"] == 0 and 0 < s["scale_min"] <= s["scale_max"]


def test_saturation_and_zero_shares():
    x = torch.tensor([[1.0, -1.0, 0.001, 0.6, 0.0]])
    s = _q(x, QuantSpec(bits=2, granularity="tensor"))  # grid {-1, 0, 1}: 0.001 rounds to zero
    assert s["saturated"] == pytest.approx(3 / 5)  # 1, -1 and 0.6 (rounds up to the end)
    assert s["zero"] == pytest.approx(1 / 4)  # of the four nonzero inputs
    assert s["scale_min"] == s["scale_max"] == pytest.approx(1.0)


def test_nonfinite_inputs_are_counted():
    x = torch.tensor([[1.0, float("nan"), float("inf"), 2.0]])
    assert _q(x, QuantSpec(bits=8, granularity="tensor"))["nonfinite"] >= 2


def test_fake_quantizer_clipping():
    x = torch.linspace(-1, 1, 101).reshape(1, -1)
    s = dict(zip(QUANTIZER_FIELDS, fake_quantizer_stats(x, x.clamp(-0.5, 0.5)).tolist()))
    assert s["clipped"] == pytest.approx(50 / 101)
    assert s["saturated"] == pytest.approx(52 / 101)  # everything at |0.5| (the two ends included)
    assert s["scale_min"] == MISSING
    s = dict(zip(QUANTIZER_FIELDS, fake_quantizer_stats(x, x).tolist()))
    assert s["clipped"] == 0 and s["zero"] == 0


def test_error_stats():
    y_ref = torch.tensor([3.0, 4.0])
    err, ref, bad = error_stats(y_ref + torch.tensor([0.3, -0.4]), y_ref).tolist()
    assert (err, ref, bad) == (pytest.approx(0.25), pytest.approx(25.0), 0.0)


def test_gradient_stats():
    g_exact = torch.zeros(3, 2)
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    redraw = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, -2.0]])
    halves = torch.ones(3, 2), torch.zeros(3, 2)
    v = dict(zip(GRADIENT_FIELDS, gradient_stats(g, redraw, g_exact, *halves, g + 1, axis=0).tolist()))
    assert v["own_var"] == pytest.approx(16 / 2)
    assert v["sampling_var"] == pytest.approx(6.0)
    assert v["total_var"] == pytest.approx(6 / 2)
    assert v["bias_dot"] == pytest.approx(1 - 4) and v["dev_a_sq"] == v["dev_b_sq"] == pytest.approx(5)
    # per output channel (rows): <d_a[r], d_b[r]> / (||d_a|| ||d_b||) = (1, 0, -4) / 5
    assert v["bias_rows"] == 3 and v["bias_rows_sum"] == pytest.approx(-3 / 5)
    assert v["bias_rows_sq"] == pytest.approx(17 / 25)
    cols = dict(zip(GRADIENT_FIELDS, gradient_stats(g, redraw, g_exact, None, None, None, axis=1).tolist()))
    assert cols["bias_rows"] == 2 and cols["sampling_var"] == cols["total_var"] == MISSING


def test_unbiased_rounding_passes_the_row_test():
    """Stochastic rounding's two draws: the per-channel products w_r have mean 0 (Theorem 1)."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, granularity="row", rounding="stochastic")
    dy, x = torch.randn(256, 16), torch.randn(256, 32)
    exact = dy.t() @ x
    w = []
    for _ in range(20):
        draws = [quantize_ref(dy, spec, Layout.PENULTIMATE) for _ in range(2)]
        a, b = ((c.float() * s) .t() @ x for c, s, *_ in draws)
        v = dict(zip(GRADIENT_FIELDS, gradient_stats(a, b, exact, None, None, None, axis=0).tolist()))
        w.append((v["bias_rows_sum"], v["bias_rows_sq"], v["bias_rows"]))
    n = sum(t[2] for t in w)
    mean = sum(t[0] for t in w) / n
    var = (sum(t[1] for t in w) - n * mean**2) / (n - 1)
    assert abs(mean / math.sqrt(var / n)) < 4
