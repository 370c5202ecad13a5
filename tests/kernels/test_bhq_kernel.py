"""The fused BHQ kernels equal bhq_quantize_ref / bhq_inverse_ref bit for bit (CPU: interpreter)."""

from __future__ import annotations

import pytest
import torch

from fqt_compiler.codegen.kernels.bhq import bhq_inverse, bhq_quantize
from fqt_compiler.bhq import bhq_inverse_ref, bhq_quantize_ref
from fqt_compiler.layout import Layout
from fqt_compiler.specs import QuantSpec
from tests.helpers.device import DEVICE

from tests.helpers.kernel_cases import assert_same

SPEC = QuantSpec(format="int", bits=4, scheme="asym", granularity="row", transform="bhq", rounding="stochastic")


def _structured(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[0] *= 1000  # one dominant row: BHQ's case
    x[n // 2] *= 30
    return x


@pytest.mark.parametrize("n,d", [(1, 5), (2, 7), (3, 70), (37, 9)], ids=str)
@pytest.mark.parametrize("spec", [SPEC, SPEC.with_(rounding="nearest", bits=8)], ids=["4bit-SR", "8bit-RN"])
def test_bhq_quantize_kernel_matches_reference(n, d, spec):
    x = _structured(n, d, seed=n).to(DEVICE)
    seed = torch.tensor([11], device=DEVICE)
    out = bhq_quantize(x, spec, Layout.DIM0, seed=seed)
    ref = bhq_quantize_ref(x, spec, Layout.DIM0, seed=seed)
    assert_same(out[:4], ref[:4])
    for k, r in zip(out[4:], ref[4:]):
        assert torch.equal(k.cpu(), r.cpu())


@pytest.mark.parametrize("layout,shape", [(Layout.PENULTIMATE, (2, 5, 6)), (Layout.LAST, (2, 6, 5))], ids=str)
def test_bhq_kernels_in_matrix_layouts(layout, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    seed = torch.tensor([5], device=DEVICE)
    out = bhq_quantize(x, SPEC, layout, seed=seed)
    ref = bhq_quantize_ref(x, SPEC, layout, seed=seed)
    assert_same(out[:4], ref[:4])


@pytest.mark.parametrize("n,d", [(2, 7), (37, 9)], ids=str)
def test_bhq_inverse_kernel_matches_reference(n, d):
    x = _structured(n, d, seed=7).to(DEVICE)
    _, _, _, _, group, u, s = bhq_quantize_ref(x, SPEC, Layout.DIM0, seed=torch.tensor([1], device=DEVICE))
    y = torch.randn(n, d, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    assert torch.equal(bhq_inverse(y, group, u, s).cpu(), bhq_inverse_ref(y, group, u, s).cpu())


def _compile(model, swap: bool):
    """Reference-mode fqt compile whose graphs optionally run the Triton twins (interpreter)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    import fqt_compiler as fqt
    from fqt_compiler.codegen import swap_to_kernel_ops
    from fqt_compiler.passes import PassContext
    from fqt_compiler.pipeline import rewrite_graph

    config = fqt.FQTConfig.from_options({"recipe": "bhq5", "execution": "reference"})
    swapped = []

    def backend(gm, example_inputs):
        params = frozenset(i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter))

        def partition(joint, joint_inputs, **kw):
            rewrite_graph(joint, PassContext(config, param_indices=params))
            return min_cut_rematerialization_partition(joint, joint_inputs, **kw)

        def compiler(g, ex):
            if swap:
                swapped.append(swap_to_kernel_ops(g, include_cpu=True))
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=compiler, bw_compiler=compiler, partition_fn=partition)(gm, example_inputs)

    return torch.compile(model, backend=backend), swapped


@pytest.mark.interpreter
def test_swapped_kernel_ops_reproduce_the_reference_graphs():
    """With the quantize / BHQ ops swapped for their Triton twins, a training step gives the
    same gradients bit for bit as with the reference ops, under the same torch seed."""
    grads = []
    for swap in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        x = torch.randn(7, 6, requires_grad=True)
        compiled, swapped = _compile(model, swap)
        torch.manual_seed(5)
        compiled(x).square().sum().backward()
        grads.append([x.grad] + [p.grad for p in model.parameters()])
        if swap:
            assert sum(swapped) >= 5  # forward quantizations, BHQ quantize + inverse, per-column SR
    for a, b in zip(*grads):
        assert torch.equal(a, b)
