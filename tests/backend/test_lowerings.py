"""fqt's Inductor lowerings (``lowerings.py``): stochastic rounding's noise is one op in
traced graphs, and Inductor's code for it gives the reference's bits, read through any view."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from fqt_compiler.lowerings import register_lowerings
from fqt_compiler.grid import hash_uniform, hash_uniform_ref
from fqt_compiler.layout import Layout
from fqt_compiler.reference import quantize_ref
from fqt_compiler.specs import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")

VIEWS = {
    "natural": lambda u: u,
    "transposed": lambda u: u.transpose(0, -1),
    "moved": lambda u: u.movedim(0, -1),
    "sliced": lambda u: u[..., ::2],
    "flattened": lambda u: u.reshape(-1),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("shape", [(7, 33), (3, 4, 5), (129,), (2, 3, 4, 5)], ids=str)
def test_inductor_draws_the_reference_noise(shape, view, dynamic):
    register_lowerings()

    def noisy(seed, x):
        return VIEWS[view](hash_uniform(seed, x.shape, x.device)) + VIEWS[view](x)

    x = torch.randn(shape)
    seed = torch.tensor([2_000_000_011])  # large: seed * 0x9E3779B9 needs the 64-bit products
    expected = VIEWS[view](hash_uniform_ref(seed, list(shape), x.device)) + VIEWS[view](x)
    torch._dynamo.reset()
    compiled, code = run_and_get_code(torch.compile(noisy, backend="inductor", fullgraph=True, dynamic=dynamic), seed, x)
    assert torch.equal(compiled, expected)
    assert "torch.ops.fqt.hash_uniform" not in "".join(code), "Inductor called the op instead of lowering it"
    assert ("ks0" in "".join(code)) == dynamic  # the symbolic case compiled on symbolic sizes

    assert torch.equal(noisy(seed, x), expected)


def test_symbolic_strides_keep_the_noise_vectorized():
    """A per-sample quantizer's shape of loop on a channels-last batch of symbolic image size:
    the loop runs along the channels, whose stride in the noise's row-major index is H*W.
    Folded into one index expression, Inductor's CPU code built each vector of that index
    element by element (an int64 buffer filled lane by lane)."""
    register_lowerings()
    x = torch.randn(2, 16, 5, 6).to(memory_format=torch.channels_last)
    seed = torch.tensor([5])

    def noisy(s, y):
        scaled = y / y.abs().amax(dim=(1, 2, 3), keepdim=True)
        return (hash_uniform(s, y.shape, y.device) + scaled).contiguous(memory_format=torch.channels_last)

    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(x, 2)
    torch._dynamo.mark_dynamic(x, 3)
    compiled, code = run_and_get_code(torch.compile(noisy, backend="inductor", fullgraph=True), seed, x)
    assert torch.equal(compiled, noisy(seed, x))
    text = "".join(code)
    assert "ks0" in text and "arange" in text
    assert "std::array<int64_t" not in text, "the noise's index vector is built lane by lane"


def test_a_stochastic_quantizer_traces_its_noise_as_one_op():
    """Written out in aten ops the hash reads each round's value twice, and Inductor inlined
    it once per read: the loop body doubled with each of its three rounds."""
    spec = QuantSpec(granularity="row", rounding="stochastic")
    gm = make_fx(lambda x, seed: quantize_ref(x, spec, Layout.DIM0, seed=seed))(torch.randn(4, 8), torch.tensor([3]))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fqt.hash_uniform.default) == 1
    assert torch.ops.aten.bitwise_xor.Tensor not in targets and torch.ops.aten.__rshift__.Scalar not in targets


def test_symbolic_sizes_trace_the_noise_as_one_op():
    """On symbolic sizes too the noise is one op (of symbolic shape), with the reference's bits
    at any size."""
    seed = torch.tensor([77])
    gm = make_fx(lambda s, x: hash_uniform(s, x.shape, x.device), tracing_mode="symbolic")(seed, torch.randn(5, 6))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fqt.hash_uniform.default) == 1 and torch.ops.aten.bitwise_xor.Tensor not in targets
    assert torch.equal(gm(seed, torch.randn(3, 7)), hash_uniform_ref(seed, [3, 7], torch.device("cpu")))


@pytest.mark.gpu
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic"])
def test_inductor_draws_the_reference_noise_in_triton_code(dynamic):
    register_lowerings()
    x = torch.randn(33, 65, device="cuda")
    seed = torch.tensor([2_000_000_011], device="cuda")
    expected = hash_uniform_ref(seed, [33, 65], x.device).t() + x.t()
    torch._dynamo.reset()
    fn = torch.compile(lambda s, y: hash_uniform(s, y.shape, y.device).t() + y.t(), backend="inductor", fullgraph=True,
                       dynamic=dynamic)
    compiled, code = run_and_get_code(fn, seed, x)
    assert torch.equal(compiled, expected)
    assert "torch.ops.fqt.hash_uniform" not in "".join(code), "Inductor called the op instead of lowering it"
