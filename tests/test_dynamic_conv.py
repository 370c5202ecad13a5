"""Convolutions whose image sizes are symbolic (``dynamic=True``, or Dynamo's automatic dynamic
shapes once a model has seen a second image size: multi-scale training, variable-size crops)
run on the low-bit kernels like static ones: their result shapes are written into the graph as
expressions of its inputs' sizes."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

import fqt_compiler as fqt
from fqt_compiler.passes.sym_sizes import size_args
from tests.helpers.recipes import nearest_gradients


def test_size_args_computes_each_symbolic_size_from_the_graph_inputs():
    """Floor division, remainder, products, powers, max / min and ceil division of input sizes are
    written as nodes, and the graph computes them for inputs of other sizes."""
    gm = make_fx(lambda x: x + 1, tracing_mode="symbolic")(torch.randn(4, 10, 7))
    ph = next(iter(gm.graph.find_nodes(op="placeholder")))
    n, h, w = ph.meta["val"].shape
    exprs = [(h - 1) // 2 + 1, h * w + n, h % 3, torch.sym_max(h, w), torch.sym_min(h, w), -(-h // 4), h * h, 5]
    out = next(iter(gm.graph.find_nodes(op="output")))
    with gm.graph.inserting_before(out):
        sizes = size_args(gm.graph, tuple(exprs))
    assert not isinstance(sizes, str), sizes
    assert sizes[-1] == 5
    out.args = ((out.args[0], *sizes),)
    gm.recompile()
    for shape in [(3, 11, 6), (2, 5, 9), (1, 16, 16)]:
        _, *got = gm(torch.randn(shape))
        N, H, W = shape
        assert got == [(H - 1) // 2 + 1, H * W + N, H % 3, max(H, W), min(H, W), -(-H // 4), H * H, 5]


def test_size_args_names_a_size_no_graph_input_holds():
    """An unbacked size (from a data-dependent op) is no input's size: a reason, not a node."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gm = make_fx(lambda x: x + 1, tracing_mode="symbolic")(torch.randn(4, 10))
    unbacked = ShapeEnv().create_unbacked_symint()
    out = next(iter(gm.graph.find_nodes(op="output")))
    with gm.graph.inserting_before(out):
        reason = size_args(gm.graph, (2, unbacked + 1))
    assert isinstance(reason, str) and "no graph input" in reason, reason


class _Net(nn.Module):
    """Strided, dilated-grouped and transposed convolutions (with output padding) in a row: every
    result size past the first is an expression of the input's."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.c = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _step(compiled, model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    compiled(x).square().sum().backward()
    return [x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.slow
def test_symbolic_image_sizes_lower_every_convolution():
    """A model seeing a second image size recompiles once with symbolic image sizes; that graph
    runs every conv GEMM on the int8 kernels (only the oneDNN sums stay calls) for every later
    size, with the gradients of the reference ops (quantize, dequantize, convolve)."""
    torch.manual_seed(0)
    model = _Net()
    sizes = [(4, 3, 12, 12), (4, 3, 15, 15), (4, 3, 9, 14)]
    xs = [torch.randn(s) for s in sizes]
    torch._dynamo.reset()
    be = fqt.backend(recipe=nearest_gradients("int8"))
    compiled = torch.compile(model, backend=be)
    dynamic = [_step(compiled, model, x) for x in xs]
    assert len(be.records) == 2  # the first size static, then one graph for every later size
    record = be.records[-1]
    gemms = [g for s in record.decisions for g in s.gemms]
    assert len(gemms) == 9 and any("s" in g.shape for g in gemms)
    assert all(g.status is fqt.GemmStatus.LOWBIT_KERNEL for g in gemms), [g.label for g in gemms]
    calls = [name for launch in record.launches for name, _ in launch.python_calls]
    assert len(calls) == 9 and all(name.startswith("conv_codes") for name in calls), calls
    torch._dynamo.reset()  # the last (non-square) size against the eager reference ops
    ref = fqt.backend(recipe=nearest_gradients("int8"), execution="reference", inductor=False)
    static = _step(torch.compile(model, backend=ref, dynamic=False), model, xs[-1])
    for g, s in zip(dynamic[-1], static):
        assert g.shape == s.shape
        assert (g - s).abs().max() <= 1e-4 * s.abs().max()


@pytest.mark.slow
def test_bhq_gradient_of_a_strided_convolution_on_symbolic_sizes():
    """BHQ's transformed gradient into a strided convolution's dgrad, on symbolic image sizes:
    its zero-point corrections are windowed sums over the spread gradient, whose size must come
    out provably the input's (it did not: floor and remainder of a symbolic size do not cancel);
    the gradients are the reference ops'."""
    torch.manual_seed(0)
    model = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    x = torch.randn(3, 4, 10, 11)
    torch._dynamo.reset()
    be = fqt.backend(recipe=nearest_gradients("bhq8"))
    got = _step(torch.compile(model, backend=be, dynamic=True), model, x)
    dgrad = [g for s in be.records[-1].decisions for g in s.gemms if g.kind is fqt.GemmKind.GRAD_INPUT]
    assert dgrad and all(g.status is fqt.GemmStatus.LOWBIT_KERNEL for g in dgrad), [g.label for g in dgrad]
    assert any("s" in g.shape for g in dgrad)
    torch._dynamo.reset()
    ref = fqt.backend(recipe=nearest_gradients("bhq8"), execution="reference", inductor=False)
    static = _step(torch.compile(model, backend=ref, dynamic=False), model, x)
    for g, s in zip(got, static):
        assert (g - s).abs().max() <= 1e-4 * s.abs().max()


def test_size_arithmetic_uses_python_operators():
    """The nodes are Python arithmetic on sizes (what Dynamo itself writes), which Inductor
    compiles to host code: no tensor op stands in for a size."""
    gm = make_fx(lambda x: x + 1, tracing_mode="symbolic")(torch.randn(4, 10))
    ph = next(iter(gm.graph.find_nodes(op="placeholder")))
    h = ph.meta["val"].shape[1]
    out = next(iter(gm.graph.find_nodes(op="output")))
    with gm.graph.inserting_before(out):
        (node,) = size_args(gm.graph, ((h + 1) // 2,))
    assert isinstance(node, fx.Node) and node.target is operator.floordiv
    assert all(n.target in (operator.floordiv, operator.add, torch.ops.aten.sym_size.int)
               for n in gm.graph.nodes if n.op == "call_function" and n.target is not torch.ops.aten.add.Tensor)


def test_stochastic_rounding_noise_on_symbolic_sizes_is_the_static_noise():
    """The hash noise traced on symbolic sizes (its index built per dim, so that Inductor's CPU
    code vectorizes it on channels-last batches) is the row-major index's noise bit for bit, in
    eager mode and compiled by Inductor with dynamic shapes."""
    from fqt_compiler.grid import hash_uniform

    seed = torch.tensor([12345])

    def noise(x, seed):
        return hash_uniform(seed, x.shape, x.device) + 0 * x

    for shape in [(3, 5, 7, 2), (4, 9), (11,)]:
        x = torch.zeros(shape)
        want = noise(x, seed)
        traced = make_fx(noise, tracing_mode="symbolic")(x, seed)
        assert any(isinstance(d, torch.SymInt) for n in traced.graph.nodes
                   if isinstance(n.meta.get("val"), torch.Tensor) for d in n.meta["val"].shape)
        assert torch.equal(traced(x, seed), want)
        compiled = torch.compile(noise, dynamic=True)
        assert torch.equal(compiled(x, seed), want)
        y = torch.zeros(tuple(d + 1 for d in shape))
        assert torch.equal(compiled(y, seed), noise(y, seed))
