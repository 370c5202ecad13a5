"""A changing batch size compiles once more (Dynamo's automatic dynamic shapes), not on every
step: the passes must never specialize a symbolic size (e.g. by int()-ing it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fqt_compiler as fqt


@pytest.mark.parametrize("mode", ["reference", "kernels"])
@pytest.mark.parametrize("recipe", ["int8", "bhq5"])
def test_new_batch_sizes_reuse_the_dynamic_graph(mode, recipe):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    be = fqt.backend(recipe=recipe, execution=mode, inductor=False)
    compiled = torch.compile(model, backend=be)
    for batch in (8, 12, 20, 24, 7):
        loss = compiled(torch.randn(batch, 16)).square().mean()
        loss.backward()
        assert torch.isfinite(loss)
    assert len(be.records) == 2  # the first (static) graph, then one dynamic graph for all
    dynamic = be.records[-1]
    assert all(g.status is not fqt.GemmStatus.SKIPPED for s in dynamic.decisions for g in s.gemms)
    assert any("s" in g.shape for s in dynamic.decisions for g in s.gemms)  # a symbolic batch
