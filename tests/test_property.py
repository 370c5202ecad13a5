"""Property-based: random small models of Linear / matmul / conv / elementwise ops go through
the passes with the verifier on, in both modes; every GEMM gets a status, and training steps
produce finite gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fqt_compiler as fqt

pytestmark = pytest.mark.usefixtures("one_thread")

OPS = ["linear", "relu", "tanh", "residual", "attention", "layernorm", "conv1d"]


class RandomNet(nn.Module):
    def __init__(self, ops: list[str], width: int) -> None:
        super().__init__()
        self.ops = ops
        self.layers = nn.ModuleList()
        for op in ops:
            if op == "linear":
                self.layers.append(nn.Linear(width, width))
            elif op == "layernorm":
                self.layers.append(nn.LayerNorm(width))
            elif op == "conv1d":
                self.layers.append(nn.Conv1d(width, width, 3, padding=1))
            else:
                self.layers.append(nn.Identity())

    def forward(self, x):  # x: (batch, tokens, width)
        for op, layer in zip(self.ops, self.layers):
            if op in ("linear", "layernorm"):
                x = layer(x)
            elif op == "relu":
                x = torch.relu(x)
            elif op == "tanh":
                x = torch.tanh(x)
            elif op == "residual":
                x = x + 0.5 * x.detach() + x.sin()
            elif op == "attention":
                scores = torch.softmax(x @ x.transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
                x = scores @ x
            elif op == "conv1d":
                x = layer(x.transpose(1, 2)).transpose(1, 2)
        return x


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=5),
    width=st.sampled_from([3, 4, 8]),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 4),
    recipe=st.sampled_from(["int8", "ptq4", "psq5", "bhq4", "fp8", "qat"]),
    kernels=st.booleans(),
)
def test_random_models_compile_verify_and_train(ops, width, batch, tokens, recipe, kernels):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = RandomNet(ops, width)
    x = torch.randn(batch, tokens, width, requires_grad=True)
    mode = dict(execution="kernels", inductor=False) if kernels else dict(execution="reference")
    be = fqt.backend(recipe=recipe, debug=True, **mode)  # debug: the verifier runs after every pass
    out = torch.compile(model, backend=be)(x)
    out.square().mean().backward()
    assert out.shape == (batch, tokens, width)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    n_gemm_ops = sum(op in ("linear", "conv1d") for op in ops) + 2 * ops.count("attention")
    decided = [g for r in be.records for s in r.decisions for g in s.gemms]
    assert len({(r.graph_id, s.site_id) for r in be.records for s in r.decisions}) >= n_gemm_ops
    for g in decided:
        assert g.status is not fqt.GemmStatus.SKIPPED or g.reason
