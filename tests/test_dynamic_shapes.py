"""A changing batch size compiles once more (Dynamo's automatic dynamic shapes), not on every
step: the passes must never specialize a symbolic size (e.g. by int()-ing it)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fqt_compiler as fqt
from tests.helpers.recipes import nearest_gradients


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


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.slow
def test_inductor_fuses_the_quantizers_of_a_dynamic_graph():
    """A graph with symbolic sizes (here ``dynamic=True``; in training, Dynamo's automatic dynamic
    shapes after a second batch size or stride) is compiled like a static one: its quantizers
    and CPU int8 GEMMs are traced into the graph for Inductor to fuse, not left as Python calls
    that run every quantizer eagerly (a convolution step took 1.3-1.7x as long), and its gradients
    are the static graph's on the eager kernels (without Inductor: what Inductor's fusion must
    not change)."""
    torch.manual_seed(0)
    model = _cnn()
    x = torch.randn(6, 3, 8, 8)
    grads, records = {}, {}
    for dynamic in (False, True):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        be = fqt.backend(recipe=nearest_gradients("int8"), inductor=dynamic)
        step = torch.compile(model, backend=be, dynamic=dynamic)
        step(x).square().sum().backward()
        grads[dynamic] = [p.grad.clone() for p in model.parameters()]
        records[dynamic] = be.records[-1]
    dynamic = records[True]
    assert any("s" in g.shape for s in dynamic.decisions for g in s.gemms)  # the sizes were symbolic
    calls = [name for launch in dynamic.launches for name, _ in launch.python_calls]
    assert calls and all(name.startswith("conv_codes") for name in calls), calls  # only the oneDNN sums
    for d, s in zip(grads[True], grads[False]):
        assert (d - s).abs().max() <= 1e-3 * s.abs().max()


@pytest.mark.slow
def test_zero_point_corrections_of_a_dynamic_convolution_graph():
    """The zero-point corrections of the conv epilogue (every GEMM of ``ptq8`` has some) traced on
    symbolic sizes: windowed sums over symbolic image sizes, with the gradients of the static
    graph on the eager kernels."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(5, 3, 7, 7, requires_grad=True)
    grads, records = {}, {}
    for dynamic in (False, True):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        x.grad = None
        be = fqt.backend(recipe=nearest_gradients("ptq8"), inductor=dynamic)
        torch.compile(model, backend=be, dynamic=dynamic)(x).square().sum().backward()
        grads[dynamic], records[dynamic] = [x.grad.clone(), *(p.grad.clone() for p in model.parameters())], be.records[-1]
    assert any("s" in g.shape for s in records[True].decisions for g in s.gemms)
    calls = [name for launch in records[True].launches for name, _ in launch.python_calls]
    assert calls and all(name.startswith("conv_codes") for name in calls), calls
    for d, s in zip(grads[True], grads[False]):
        assert (d - s).abs().max() <= 1e-4 * s.abs().max()


def test_a_second_layout_of_the_same_module_code_keeps_the_fused_quantizers():
    """Two compiles of one module class share Dynamo's code cache: a baseline compiled on
    contiguous inputs makes the later fqt compile on channels-last inputs trace with symbolic
    strides. Its quantizers are fused all the same."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(4, 8, 10, 10)
    torch.compile(copy.deepcopy(conv))(x).sum().backward()
    be = fqt.backend(recipe="int8")
    cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    torch.compile(cl, backend=be)(x.to(memory_format=torch.channels_last)).sum().backward()
    calls = [name for r in be.records for launch in r.launches for name, _ in launch.python_calls]
    assert calls and all(name.startswith("conv_codes") for name in calls), calls
