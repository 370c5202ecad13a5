"""Evaluation after training: graphs traced without autograd (``model.eval()`` under
``no_grad`` / ``inference_mode``) are quantized like the training forward by default, or left
in high precision with ``inference="high_precision"``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fqt_compiler as fqt


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("inference", ["quantized", "high_precision"])
def test_evaluation_after_training(inference, no_grad):
    model = _model()
    x = torch.randn(8, 16)
    be = fqt.backend(recipe="int8", inference=inference, inductor=False)
    compiled = torch.compile(model, backend=be)
    compiled(x).sum().backward()  # a training step: a joint graph, quantized
    model.eval()
    with no_grad():
        out = compiled(x)
    kinds = [r.kind for r in be.records]
    assert kinds[0] == "joint" and len(kinds) == 2  # evaluation is its own graph
    with torch.no_grad():
        exact = model(x)
    if inference == "high_precision":
        assert kinds[1] == "inference (high precision)" and be.records[1].decisions == []
        torch.testing.assert_close(out, exact)
    else:
        assert kinds[1] == "inference"
        assert [g.status for s in be.records[1].decisions for g in s.gemms] == [fqt.GemmStatus.LOWBIT_KERNEL] * 2
        assert not torch.equal(out, exact) and torch.allclose(out, exact, atol=0.05)  # int8 error, nothing more


def test_inference_option_is_validated():
    with pytest.raises(fqt.OptionsError, match="inference='fp32'"):
        fqt.backend(inference="fp32")
