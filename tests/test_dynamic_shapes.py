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


def test_convolutions_with_a_dynamic_batch_stay_on_int8_kernels():
    """After a second batch size Dynamo traces the batch symbolically: the convolution GEMMs of
    that graph still run on the int8 kernels, sized from the graph (a node reading the batch
    size, not a raw symbolic value), and give the reference step's gradients."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 3))
    be = fqt.backend(recipe="int8", inductor=False)
    compiled = torch.compile(model, backend=be)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (4, 5, 7):
            compiled(torch.randn(n, 3, 8, 8)).sum().backward()
    assert not [w for w in caught if "SymInt" in str(w.message)]
    dynamic = be.records[-1]
    convs = [g for s in dynamic.decisions if s.op == "aten.convolution" for g in s.gemms]
    assert len(convs) == 5 and all(g.status is fqt.GemmStatus.LOWBIT_KERNEL for g in convs)
    x = torch.randn(6, 3, 8, 8)
    grads = {}
    for execution in ("reference", "kernels"):
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        step = torch.compile(model, backend=fqt.backend(recipe="int8", execution=execution, inductor=False), dynamic=True)
        torch.manual_seed(3)
        step(x).sum().backward()
        grads[execution] = [p.grad.clone() for p in model.parameters()]
    for k, r in zip(grads["kernels"], grads["reference"]):
        assert (k - r).abs().max() <= 1e-4 * r.abs().max()
