"""Hard inputs through the backend: NaN / Inf propagate, half precision, channels-last, tiny
batches, activation checkpointing (the recomputed forward quantizes identically)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fqt_compiler as fqt
from tests.helpers.recipes import nearest_gradients

pytestmark = pytest.mark.usefixtures("one_thread")
MODES = [dict(execution="reference"), dict(execution="kernels", inductor=False)]
MODE_IDS = ["reference", "kernels"]


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _compile(model, recipe, mode):
    return torch.compile(model, backend=fqt.backend(recipe=recipe, **mode))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_nan_in_activations_and_inf_in_gradients_propagate(mode):
    lin = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    x[1, 2] = float("nan")
    y = _compile(lin, "int8", mode)(x)
    y.sum().backward()
    assert y.isnan().any() and lin.weight.grad.isnan().any()  # never silently finite
    torch._dynamo.reset()
    lin = nn.Linear(8, 4)
    y = _compile(lin, "psq4", mode)(torch.randn(5, 8))
    g = torch.randn(5, 4)
    g[0, 0] = float("inf")
    y.backward(g)
    assert (~lin.weight.grad.isfinite()).any()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_half_precision_models(mode, dtype):
    lin = nn.Linear(8, 4).to(dtype)
    y = _compile(lin, "bhq5", mode)(torch.randn(5, 8, dtype=dtype))
    y.float().sum().backward()
    assert y.dtype == dtype and lin.weight.grad.dtype == dtype and lin.weight.grad.isfinite().all()


@pytest.mark.parametrize("recipe", ["int8", "psq8", "bhq8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models_lower_what_fp32_lowers(dtype, recipe):
    """Every GEMM of a half-precision model (convolution and Linears, input, weight and
    gradient GEMMs) gets the decision it gets in fp32: the dequantization chain of a half
    operand ends in a cast back to its dtype, after BHQ's inverse transform where there is one
    (which once left every BHQ grad_input simulated, 'unrecognised dequantization chain'). The
    low-bit kernels' gradients match the reference execution's (whose GEMMs run in the half
    dtype) to its precision."""

    def run(dt, **mode):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
                              nn.GELU(), nn.Linear(16, 4)).to(dt)
        x = torch.randn(2, 3, 4, 4, dtype=dt, requires_grad=True)
        be = fqt.backend(recipe=recipe, **mode)
        torch.compile(model, backend=be)(x).float().square().mean().backward()
        grads = [x.grad, *(p.grad for p in model.parameters())]
        assert all(g.dtype == dt and g.isfinite().all() for g in grads)
        return [(d.module_path, g.kind, g.status, g.reason) for r in be.records for d in r.decisions for g in d.gemms], grads

    half, grads = run(dtype, execution="kernels", inductor=False)
    assert half == run(torch.float32, execution="kernels", inductor=False)[0]
    assert sum(status is fqt.GemmStatus.LOWBIT_KERNEL for _, _, status, _ in half) >= 5
    for got, ref in zip(grads, run(dtype, execution="reference")[1]):
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 5e-2


@pytest.mark.slow
def test_bhq_gradients_of_a_bf16_model_through_inductor():
    """The lowered BHQ grad_input of a bf16 model (low-bit GEMM, inverse transform on its fp32
    output rows, cast to bf16) compiled by Inductor: every GEMM on the low-bit kernels, the
    reference's gradients to bf16 precision."""

    def run(**mode):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).to(torch.bfloat16)
        x = torch.randn(4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
        be = fqt.backend(recipe="bhq8", **mode)
        torch.compile(model, backend=be)(x).float().square().mean().backward()
        return be, [x.grad, *(p.grad for p in model.parameters())]

    be, grads = run(execution="kernels", inductor=True)
    statuses = [g.status for r in be.records for d in r.decisions for g in d.gemms]
    assert len(statuses) == 6 and set(statuses) == {fqt.GemmStatus.LOWBIT_KERNEL}
    for got, ref in zip(grads, run(execution="reference")[1]):
        assert got.dtype == torch.bfloat16 and ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 5e-2


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_tiny_batches_and_channels_last(mode, batch):
    model = CNN()
    x = torch.randn(batch, 3, 5, 5).to(memory_format=torch.channels_last).requires_grad_(True)
    y = _compile(model, "bhq4", mode)(x)
    y.sum().backward()
    assert x.grad.isfinite().all() and model.conv.weight.grad.isfinite().all()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_activation_checkpointing_recomputes_identical_quantized_values(mode):
    grads = []
    for use_checkpoint in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        l1, l2 = nn.Linear(8, 8), nn.Linear(8, 4)
        x = torch.randn(5, 8, requires_grad=True)

        def block(t):
            return torch.relu(l1(t))

        def f(t):
            return l2(checkpoint(block, t, use_reentrant=False) if use_checkpoint else block(t))

        _compile(f, nearest_gradients("int8"), mode)(x).square().sum().backward()
        grads.append([x.grad, l1.weight.grad, l2.weight.grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


class _CheckpointedBN(nn.Module):
    """A BatchNorm inside a checkpointed block: its running statistics are a buffer the
    forward mutates and the backward's recomputation reads again."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + checkpoint(self.block, x, use_reentrant=False)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_batchnorm_inside_activation_checkpointing_trains(mode):
    """Its buffer update stays in the compiled graph (as torch's own backends keep it): the
    backward used to refuse the saved running mean that the copy back had bumped. Compiled,
    the statistics update once per step (eager checkpointing updates them again when it
    recomputes), as under torch's ``aot_eager``."""
    torch.manual_seed(0)
    model = _CheckpointedBN()
    ref = _CheckpointedBN()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 6, 6)
    _compile(model, "exact", mode)(x).square().sum().backward()
    torch.compile(ref, backend="aot_eager")(x).square().sum().backward()
    for got, want in ((model.block[1].running_mean, ref.block[1].running_mean), (model.stem.weight.grad, ref.stem.weight.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.block[1].num_batches_tracked.item() == 1
    _compile(_CheckpointedBN(), "psq8", mode)(x).square().sum().backward()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("recipe", ["int8", "ptq4", "psq4", "bhq4"])
@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 1e30], ids=["zero", "tiny", "huge"])
def test_zero_tiny_and_huge_gradients(mode, recipe, magnitude):
    """All-zero gradients stay exactly zero; tiny and huge ones keep their scale (never
    flushed to zero, never overflowing to inf): quantization is relative to the tensor."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(6, 8, requires_grad=True)
    y = _compile(lin, recipe, mode)(x)
    g = torch.randn(6, 4) * magnitude
    y.backward(g)
    for grad in (x.grad, lin.weight.grad):
        assert torch.isfinite(grad).all()
        if magnitude == 0:
            assert torch.equal(grad, torch.zeros_like(grad))
    if magnitude:
        exact = (g.double() @ lin.weight.detach().double())  # grad_input without quantization
        rel = (x.grad.double() - exact).norm() / exact.norm()  # fp64: 1e30 squared overflows fp32
        assert rel < 0.6, rel  # 4-bit noise is large, but the scale is right


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_non_contiguous_inputs(mode):
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    base = torch.randn(8, 12)
    x = base.t()[::2]  # a strided, transposed view
    assert not x.is_contiguous()
    y = _compile(lin, "int8", mode)(x)
    ref = lin(x.contiguous())
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("recipe", ["int8", "ptq8", "psq8", "bhq8", "fp8"])
def test_a_batch_of_size_zero_trains_like_eager(recipe, mode):
    """Regression: empty scale groups crashed the quantizers (an amax over no elements, BHQ's
    grouping of no rows). Eager returns empty outputs and zero gradients; so must fqt."""
    for model, x in ((nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(0, 6)),
                     (CNN(), torch.randn(0, 3, 5, 5))):
        torch._dynamo.reset()
        x.requires_grad_(True)
        out = _compile(model, recipe, mode)(x)
        out.sum().backward()
        assert out.shape == (0, 3) and x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("mode", [*MODES, dict(execution="kernels")], ids=[*MODE_IDS, "kernels-inductor"])
def test_integer_inputs_raise_like_eager(mode):
    """Regression: a Linear fed int64 raised in eager but gave finite outputs under fqt (the
    quantizer turned the integer operand into floats). The GEMM is left as traced, with the reason."""
    lin = nn.Linear(4, 3)
    x = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="same dtype"):
        lin(x)
    be = fqt.backend(recipe="int8", **mode)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.compile(lin, backend=be)(x)
    reasons = [g.reason for r in be.records for s in r.decisions for g in s.gemms]
    assert reasons and all("torch.int64 x torch.float32" in why for why in reasons), reasons


class _SizeOneGemms(nn.Module):
    """A one-feature input (a time or noise-level embedding), a one-feature head (a value or
    regression head), and a one-column weight: every GEMM of the step has a dim of 1."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(1, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, t, x):
        return self.head(torch.relu(self.body(x + self.embed(t))))


@pytest.mark.parametrize("inductor", [False, True], ids=["eager-kernels", "inductor"])
@pytest.mark.parametrize("recipe", ["int8", "psq8"])
@pytest.mark.parametrize("rows", [8, 1])
def test_gemms_with_a_dim_of_one_equal_the_reference(recipe, inductor, rows):
    """Regression: a GEMM with a dim of 1 gave garbage on the CPU's int8 kernel (a loss of 1e15
    on a model with a one-feature head): ``torch._int_mm`` misreads a size-1 dim's stride, and
    Inductor hands it such views. Every GEMM of the step is the reference's to round-off
    (gradients rounded to nearest: Inductor draws its own random numbers)."""
    recipe = nearest_gradients(recipe)
    grads = {}
    for mode in (dict(execution="reference", inductor=False), dict(execution="kernels", inductor=inductor)):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _SizeOneGemms()
        t, x = torch.randn(rows, 1), torch.randn(rows, 16)
        torch.manual_seed(1)
        be = fqt.backend(recipe=recipe, **mode)
        loss = torch.compile(model, backend=be)(t, x).square().sum()
        loss.backward()
        grads[mode["execution"]] = [loss.detach()] + [p.grad for p in model.parameters()]
    # Inductor's decompositions rewrite some GEMMs with a dim of 1 into multiplies and sums: every
    # site must still reach the pass, and run on the int8 kernel
    statuses = [g.status for s in be.records[0].decisions for g in s.gemms]
    assert statuses == [fqt.GemmStatus.LOWBIT_KERNEL] * 8, statuses  # 3 Linears x 3, less the input's gradient
    for ref, got in zip(grads["reference"], grads["kernels"]):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), (got, ref)


@pytest.mark.parametrize("inductor", [False, True], ids=["eager-kernels", "inductor"])
def test_weights_cast_by_autocast_stay_weights(inductor):
    """Regression: under autocast the weight reaches its GEMM through a cast; with Inductor's
    decompositions that cast is ``prims.convert_element_type``, which hid the weight: the
    Linear's backward GEMMs were classified activation x activation and stayed simulated."""
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    be = fqt.backend(recipe="int8", inductor=inductor)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.compile(model, backend=be)(torch.randn(4, 6, 16))
    y.float().sum().backward()
    gemms = [g for s in be.records[0].decisions for g in s.gemms]
    assert [g.status for g in gemms] == [fqt.GemmStatus.LOWBIT_KERNEL] * 6, [(g.status, g.reason) for g in gemms]
    assert {g.kind.value for g in gemms} == {"output", "grad_input", "grad_weight"}
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


class _VectorProducts(nn.Module):
    """Matrix-vector and vector-vector products next to a Linear: an attention-pooling score
    (``h @ v``), ``dot``, ``addmv``, ``vdot`` and ``addr``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.v = nn.Parameter(torch.randn(8))
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return (torch.matmul(h, self.v).sum() + torch.dot(self.w, h[:4, 0]) + torch.addmv(self.w, h[:4, :4], self.v[:4]).sum()
                + torch.vdot(self.v, h[0]) + torch.addr(h[:, :4], self.v, self.w).sum())


@pytest.mark.parametrize("inductor", [True, False], ids=["inductor", "no-inductor"])
def test_matrix_vector_products_are_skipped_and_compile(inductor):
    """The pass records matrix-vector products as skipped (memory bound) and leaves them in
    high precision; under Inductor, which has no lowering for them, they are then decomposed
    (Inductor's own fallback asserted on them: 'both a fallback and a decomp for same op')."""
    torch.manual_seed(0)
    model, x = _VectorProducts(), torch.randn(8, 8)
    ref = model(x)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    be = fqt.backend(recipe="int8", inductor=inductor)
    out = torch.compile(model, backend=be)(x)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=0.02, atol=0.05)
    for name, p in model.named_parameters():
        assert ((p.grad - want[name]).norm() / want[name].norm()) < 0.05, name
    labels = [g.label for r in be.records for s in r.decisions for g in s.gemms]
    assert sum("matrix-vector" in label for label in labels) >= 5
    assert any(label.startswith("lowbit") for label in labels)  # the Linear still runs low-bit
