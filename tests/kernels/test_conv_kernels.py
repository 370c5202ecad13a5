"""Low-bit convolution GEMMs (forward, dgrad, wgrad): the CPU int8 kernels against the exact
integer convolution, and ``fqt::qconv`` against quantize -> dequantize -> high-precision
convolution, on random geometries (1-D / 2-D / 3-D, stride, padding, dilation, groups) and
every statistics layout the legality rules admit, zero points and offsets included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fqt_compiler.codegen.kernels.conv_cpu import conv_codes_cpu, onednn_available, onednn_int8_mode
from fqt_compiler.conv import ConvGeometry, layout_problem, qconv_ref
from fqt_compiler.ops import CONV_KINDS, qconv_op
from fqt_compiler.grid import QOperand
from fqt_compiler.specs import GemmKind
from tests.helpers.recipes import nearest_gradients

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN int8 convolution"),
]

KINDS = list(CONV_KINDS)
# the axis of a / b whose statistics the GEMM can apply (conv.py's table)
AXES = {GemmKind.OUTPUT: (0, 0), GemmKind.GRAD_INPUT: (0, 1), GemmKind.GRAD_WEIGHT: (1, 1)}


@st.composite
def geometries(draw) -> ConvGeometry:
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c, k = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
    n = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    stride = [draw(st.integers(1, 3)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    padding = [draw(st.integers(0, 2)) for _ in range(dims)]
    # every dim at least one window long
    size = [draw(st.integers(max(1, d * (kk - 1) + 1 - 2 * p), 9)) for d, kk, p in zip(dilation, kernel, padding)]
    x_shape, w_shape = (n, c, *size), (k, c // groups, *kernel)
    y = torch.ops.aten.convolution(torch.zeros(x_shape), torch.zeros(w_shape), None, stride, padding, dilation, False,
                                   [0] * dims, groups)
    return ConvGeometry(tuple(stride), tuple(padding), tuple(dilation), groups, x_shape, w_shape, tuple(y.shape))


def _codes(shape, gen) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)


def _operand(shape, axis, per_axis, zero_point, offset, gen) -> QOperand:
    s_shape = [1] * len(shape)
    if per_axis:
        s_shape[axis] = shape[axis]
    scale = torch.rand(s_shape, generator=gen) + 0.05
    zp = torch.randint(-128, 8, s_shape, generator=gen).float() if zero_point else None
    off = torch.randn(s_shape, generator=gen) if offset else None
    return QOperand(_codes(shape, gen), scale, zp, off)


def _dequantized(q: QOperand) -> torch.Tensor:
    x = q.codes.double()
    if q.zero_point is not None:
        x = x - q.zero_point.double()
    x = x * q.scale.double()
    return x + q.offset.double() if q.offset is not None else x


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geo=geometries(), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16), channels_last=st.booleans())
def test_cpu_kernels_equal_the_integer_convolution(geo, kind, seed, channels_last):
    """oneDNN (fprop, dgrad with stride spreading) and the per-offset int_mm wgrad give the
    exact integer sums, rounded to fp32 once, as the fp64 convolution of the codes does, on
    contiguous and on channels-last codes (a channels-last model's)."""
    gen = torch.Generator().manual_seed(seed)
    a_shape, b_shape = geo.operand_shapes(kind)
    a, b = _codes(a_shape, gen), _codes(b_shape, gen)
    if channels_last and geo.spatial in (2, 3):
        fmt = torch.channels_last if geo.spatial == 2 else torch.channels_last_3d
        a, b = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
    got = conv_codes_cpu(kind, a, b, geo)
    want = geo.bilinear(kind, a.double(), b.double())
    assert got.shape == want.shape
    assert torch.equal(got, want.float()), (got - want).abs().max()


@pytest.mark.parametrize("level", [127, -128])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_the_worst_codes_give_exact_sums(kind, level):
    """Activations at 127 (uint8 255 inside oneDNN) against weights at 127 / -128: on a CPU
    without VNNI a pair of such products overflows int16, which oneDNN saturates; the sums
    must come back exact on every CPU (split weights there)."""
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), 1, (2, 16, 5, 5), (4, 16, 3, 3), (2, 4, 5, 5))
    a_shape, b_shape = geo.operand_shapes(kind)
    a = torch.full(a_shape, 127 if kind is not GemmKind.GRAD_WEIGHT else level, dtype=torch.int8)
    b = torch.full(b_shape, level if kind is not GemmKind.GRAD_WEIGHT else 127, dtype=torch.int8)
    got = conv_codes_cpu(kind, a, b, geo)
    assert torch.equal(got, geo.bilinear(kind, a.double(), b.double()).float())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geo=geometries(), kind=st.sampled_from([GemmKind.OUTPUT, GemmKind.GRAD_INPUT]), seed=st.integers(0, 2**16))
def test_split_weights_give_the_same_sums(geo, kind, seed):
    """The path of CPUs whose oneDNN saturates int16 pair sums (weights split into two halves
    of at most 64 in magnitude, one convolution with both), run here whatever this CPU is."""
    gen = torch.Generator().manual_seed(seed)
    a_shape, b_shape = geo.operand_shapes(kind)
    a, b = _codes(a_shape, gen), _codes(b_shape, gen)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fqt_compiler.codegen.kernels.conv_cpu.onednn_int8_mode", lambda: "split")
        got = conv_codes_cpu(kind, a, b, geo)
    assert torch.equal(got, geo.bilinear(kind, a.double(), b.double()).float())


def test_the_cpu_probe_picks_an_exact_mode():
    """oneDNN is probed once per process; on x86 one of the two modes is exact."""
    assert onednn_int8_mode() in ("direct", "split")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geo=geometries(), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16),
       layout=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans()))
def test_qconv_equals_dequantize_then_convolve(geo, kind, seed, layout):
    """fqt::qconv (and its reference) against quantize -> dequantize -> fp64 convolution, for
    per-tensor / per-axis scales with and without zero points and offsets (the windowed-sum
    corrections at the borders, padding and groups included): equal to fp32 round-off."""
    gen = torch.Generator().manual_seed(seed)
    a_shape, b_shape = geo.operand_shapes(kind)
    ax_a, ax_b = AXES[kind]
    a = _operand(a_shape, ax_a, *layout[:3], gen)
    b = _operand(b_shape, ax_b, *layout[3:], gen)
    bias = torch.randn(geo.w_shape[0], generator=gen) if kind is GemmKind.OUTPUT else None
    want = geo.bilinear(kind, _dequantized(a), _dequantized(b))
    if bias is not None:
        want = want + bias.double().reshape(1, -1, *(1,) * geo.spatial)
    out_shape = list(geo.out_shape(kind))
    got = qconv_op(KINDS.index(kind), *a, *b, bias, list(geo.stride), list(geo.padding), list(geo.dilation), geo.groups,
                   out_shape, torch.float32, False)
    ref = qconv_ref(kind, a, b, geo, bias, torch.float32)
    scale = want.abs().max().item() + 1e-30
    assert got.shape == want.shape and got.is_contiguous()
    assert (got.double() - want).abs().max().item() <= 2e-6 * scale
    assert (ref.double() - want).abs().max().item() <= 2e-6 * scale
    if a.zero_point is None and b.zero_point is None and a.offset is None and b.offset is None:
        assert torch.equal(got, ref), "symmetric codes: kernel and reference agree bit for bit"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geo=geometries(), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16), channels_last=st.booleans())
def test_windowed_sums_by_views_equal_the_convolution_with_ones(geo, kind, seed, channels_last):
    """The zero-point corrections' windowed sums, written as one strided view per kernel offset
    (integer, exact), equal the fp64 convolutions with all-ones operands that large kernels use."""
    from fqt_compiler import conv

    gen = torch.Generator().manual_seed(seed)
    a_shape, b_shape = geo.operand_shapes(kind)
    a, b = _codes(a_shape, gen), _codes(b_shape, gen)
    if channels_last and geo.spatial in (2, 3):
        fmt = torch.channels_last if geo.spatial == 2 else torch.channels_last_3d
        a = a.contiguous(memory_format=fmt)
    zero = torch.zeros((), dtype=torch.float64)
    by_views = geo.sum_a(kind, a), geo.sum_b(kind, b), geo.sum_ones(kind, zero)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(conv, "WINDOW_OFFSETS", 0)
        by_conv = geo.sum_a(kind, a), geo.sum_b(kind, b), geo.sum_ones(kind, zero)
    for got, want in zip(by_views, by_conv):
        assert got.dtype == torch.float64 and got.shape == want.shape
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_zero_point_corrections_of_a_kernel_with_many_offsets(kind):
    """A 1-D kernel longer than ``WINDOW_OFFSETS`` takes the convolved windowed sums, with the
    same result as dequantize-then-convolve."""
    from fqt_compiler.conv import WINDOW_OFFSETS

    gen = torch.Generator().manual_seed(3)
    k = WINDOW_OFFSETS + 6
    geo = ConvGeometry((2,), (5,), (1,), 1, (2, 3, 90), (4, 3, k), (2, 4, (90 + 10 - k) // 2 + 1))
    a_shape, b_shape = geo.operand_shapes(kind)
    ax_a, ax_b = AXES[kind]
    a = _operand(a_shape, ax_a, True, True, True, gen)
    b = _operand(b_shape, ax_b, False, True, False, gen)
    want = geo.bilinear(kind, _dequantized(a), _dequantized(b))
    got = qconv_op(KINDS.index(kind), *a, *b, None, list(geo.stride), list(geo.padding), list(geo.dilation), geo.groups,
                   list(geo.out_shape(kind)), torch.float32, False)
    assert (got.double() - want).abs().max().item() <= 2e-6 * want.abs().max().item()


def test_a_nonzero_weight_zero_point_is_applied():
    """oneDNN ignores a weight zero point without a word (about 5% error); qconv applies it as
    a windowed sum of the input, so a zero-on-grid weight convolves exactly."""
    gen = torch.Generator().manual_seed(3)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), 1, (2, 8, 6, 6), (16, 8, 3, 3), (2, 16, 6, 6))
    x = QOperand(_codes(geo.x_shape, gen), torch.tensor(0.02))
    w = QOperand(_codes(geo.w_shape, gen), torch.tensor(0.01), torch.tensor(-37.0))
    want = geo.conv(_dequantized(x), _dequantized(w))
    got = qconv_op(0, *x, *w, None, [1, 1], [1, 1], [1, 1], 1, list(geo.y_shape), torch.float32, False)
    ignored = qconv_op(0, *x, w.codes, w.scale, None, None, None, [1, 1], [1, 1], [1, 1], 1, list(geo.y_shape),
                       torch.float32, False)
    assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
    assert (ignored.double() - want).abs().max() > 1e-2 * want.abs().max(), "the zero point matters here"


def test_channels_last_result_when_the_convolution_was():
    gen = torch.Generator().manual_seed(4)
    geo = ConvGeometry((1, 1), (0, 0), (1, 1), 1, (2, 4, 5, 5), (6, 4, 1, 1), (2, 6, 5, 5))
    x, w = QOperand(_codes(geo.x_shape, gen), torch.tensor(0.1)), QOperand(_codes(geo.w_shape, gen), torch.tensor(0.1))
    out = qconv_op(0, *x, *w, None, [1, 1], [0, 0], [1, 1], 1, list(geo.y_shape), torch.float32, True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, qconv_ref(GemmKind.OUTPUT, x, w, geo, None, torch.float32))


@pytest.mark.parametrize("recipe", ["int8", "psq8"])
def test_inductor_writes_the_codes_of_a_channels_last_step_channels_last(monkeypatch, recipe):
    """Every activation / gradient operand of every conv GEMM reaches the kernels in the
    channels-last order of the step: Inductor is held to the traced strides of ``fqt::qconv``'s
    inputs (left free, it wrote them contiguous through transposes, and the kernels copied them
    back)."""
    import fqt_compiler as fqt
    from fqt_compiler.codegen.kernels import conv_cpu

    seen = []
    real = conv_cpu.conv_codes_cpu

    def spy(kind, a, b, geo, a_zero=0):
        seen.append((kind, a.is_contiguous(memory_format=torch.channels_last),
                     b.dim() < 4 or kind is GemmKind.OUTPUT or b.is_contiguous(memory_format=torch.channels_last)))
        return real(kind, a, b, geo, a_zero)

    monkeypatch.setattr(conv_cpu, "conv_codes_cpu", spy)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    torch.compile(conv, backend=fqt.backend(recipe=recipe, execution="kernels"))(x).sum().backward()
    kinds = {kind for kind, _, _ in seen}
    assert {GemmKind.OUTPUT, GemmKind.GRAD_INPUT} <= kinds and (recipe != "int8" or GemmKind.GRAD_WEIGHT in kinds)
    assert all(a_ok and b_ok for _, a_ok, b_ok in seen), seen


def test_inductor_stores_no_activation_sized_fp32_buffer():
    """An int8 convolution step's quantizers read their fp32 input and write 8-bit codes, nothing in
    between: no activation-sized fp32 buffer in the forward or the backward. Each once was
    there -- the rounded levels, read three times by the NaN test; the stochastic-rounding
    hash, whose inlined expression passed Inductor's size cap; the dequantized activation the
    int8 wgrad requantizes, read by both of its passes."""
    from torch._inductor.utils import run_and_get_code  # Inductor internals: the generated source

    import fqt_compiler as fqt

    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    step = torch.compile(conv, backend=fqt.backend(recipe="int8", execution="kernels"))
    _, sources = run_and_get_code(lambda: step(x).sum().backward())
    assert len(sources) == 2
    for source in sources:
        assert "(4, 16, 8, 8), (1024, 1, 128, 16), torch.float32)" not in source, source


@pytest.mark.slow
def test_inductor_fuses_the_convolution_epilogue():
    """Inductor compiles each CPU conv GEMM as ``fqt::conv_codes`` (the oneDNN / int_mm sums) and
    the epilogue traced in after it, so the dequantization and the zero-point corrections
    (every GEMM of ``ptq8`` has some) fuse with their readers: no other Python call, no fp64
    convolution (the windowed sums are strided views), and the eager kernels' gradients. (The
    int8 recipe's symmetric case: ``test_dynamic_shapes``.)"""
    from torch._inductor.utils import run_and_get_code  # Inductor internals: the generated source

    import fqt_compiler as fqt

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1),
    ).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    grads, records = {}, {}
    for inductor in (False, True):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        be = fqt.backend(recipe=nearest_gradients("ptq8"), inductor=inductor)
        step = torch.compile(model, backend=be)
        _, sources = run_and_get_code(lambda: step(x).square().sum().backward())
        grads[inductor], records[inductor] = [p.grad.clone() for p in model.parameters()], be.records[-1]
    lowered = [g for s in records[True].decisions for g in s.gemms if g.status.value == "lowbit-kernel"]
    assert len(lowered) == 8  # three convolutions, the first without grad_input
    calls = [name for launch in records[True].launches for name, _ in launch.python_calls]
    assert len(calls) == 8 and all(name.startswith("conv_codes") for name in calls), calls
    assert all("aten.convolution.default" not in source for source in sources)
    for got, want in zip(grads[True], grads[False]):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_layout_problem_names_the_varying_operand(kind):
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), 1, (2, 4, 5, 5), (6, 4, 3, 3), (2, 6, 5, 5))
    a_shape, b_shape = geo.operand_shapes(kind)
    ax_a, ax_b = AXES[kind]
    ok_a = tuple(s if i == ax_a else 1 for i, s in enumerate(a_shape))
    ok_b = tuple(s if i == ax_b else 1 for i, s in enumerate(b_shape))
    assert layout_problem(kind, geo, [ok_a, ()], [ok_b, None]) is None
    per_position = (1, *a_shape[1:])  # the paper's per-(channel, position) columns
    why = layout_problem(kind, geo, [per_position], [ok_b])
    assert why is not None and "vary along the contraction" in why


@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(3, 6, 5, 4), (1, 6, 7), (2, 6, 2, 3, 4), (4, 6, 1, 1)])
def test_channel_and_batch_sums_of_codes(shape, groups, memory):
    """The windowed sums' first reductions (int8 GEMMs against ones where the layout allows,
    a plain sum elsewhere) equal the fp64 sums as exact int64, size-1 dims included."""
    from fqt_compiler.conv import batch_sums, channel_sums

    t = torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(7))
    if memory == "channels_last" and t.dim() in (4, 5):
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    want = t.double().reshape(shape[0], groups, shape[1] // groups, *shape[2:]).sum(2)
    assert channel_sums(t, groups).dtype == batch_sums(t).dtype == torch.int64
    assert torch.equal(channel_sums(t, groups).double(), want)
    assert torch.equal(batch_sums(t).double(), t.double().sum(0, keepdim=True))


# geometries oneDNN's int8 convolution got wrong (or, on one thread, crashed on) with its own
# padding: windows wholly in the padding, padding as wide as the input, grouped and
# single-channel convolutions; the kernels pad those explicitly
ONEDNN_EDGES = [
    ((3, 1), (2, 2), (1, 1), 3, (1, 3, 2, 2), (12, 1, 2, 1)),
    ((2, 3), (0, 2), (1, 2), 1, (1, 1, 3, 1), (1, 1, 2, 1)),
    ((2,), (1,), (2,), 2, (1, 6, 1), (2, 3, 1)),
    ((1, 1, 1), (1, 2, 1), (2, 2, 2), 3, (2, 12, 1, 8, 2), (3, 4, 2, 2, 1)),
    ((2, 1, 2), (2, 1, 0), (2, 1, 1), 3, (3, 3, 1, 3, 8), (6, 1, 2, 2, 3)),
    ((2, 1, 1), (2, 0, 0), (2, 2, 1), 1, (3, 1, 1, 7, 9), (3, 1, 2, 3, 2)),
    ((1, 2), (0, 0), (1, 1), 2, (1, 2, 8, 3), (6, 1, 1, 3)),
]


@pytest.mark.parametrize("case", ONEDNN_EDGES, ids=lambda c: f"s{c[0]}p{c[1]}d{c[2]}g{c[3]}x{c[4]}")
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_onednn_edge_geometries(case, kind):
    stride, padding, dilation, groups, x_shape, w_shape = case
    y = torch.ops.aten.convolution(torch.zeros(x_shape), torch.zeros(w_shape), None, list(stride), list(padding),
                                   list(dilation), False, [0] * len(stride), groups)
    geo = ConvGeometry(stride, padding, dilation, groups, x_shape, w_shape, tuple(y.shape))
    gen = torch.Generator().manual_seed(9)
    a_shape, b_shape = geo.operand_shapes(kind)
    a, b = _codes(a_shape, gen), _codes(b_shape, gen)
    assert torch.equal(conv_codes_cpu(kind, a, b, geo).double(), geo.bilinear(kind, a.double(), b.double()).float().double())


@pytest.mark.parametrize("provider", ["int_mm", "fp32"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups, k_per_group, c_per_group", [(24, 1, 1), (24, 2, 1), (4, 3, 5), (2, 16, 16)],
                         ids=["depthwise", "multiplier-2", "small-groups", "large-groups"])
def test_grouped_weight_gradients_are_exact_over_long_reductions(provider, stride, groups, k_per_group, c_per_group,
                                                                  monkeypatch):
    """A grouped convolution's weight gradient runs its groups batched (int16 products for a
    depthwise one, fp32 GEMMs in exact chunks, or torch._int_mm per large group): over more
    than 1024 output positions and at the worst codes, still the exact integer sums."""
    from fqt_compiler import int8_gemm

    monkeypatch.setenv("FQT_CPU_INT8_GEMM", provider)
    int8_gemm.int8_gemm_provider.cache_clear()
    try:
        c, k = groups * c_per_group, groups * k_per_group
        x_shape = (3, c, 26, 26)
        y = torch.nn.functional.conv2d(torch.zeros(x_shape), torch.zeros(k, c_per_group, 3, 3), stride=stride, padding=1,
                                       groups=groups)
        geo = ConvGeometry((stride, stride), (1, 1), (1, 1), groups, x_shape, (k, c_per_group, 3, 3), tuple(y.shape))
        gen = torch.Generator().manual_seed(groups + stride)
        for dy, x in ((_codes(geo.y_shape, gen), _codes(x_shape, gen)),
                      (torch.full(geo.y_shape, -128, dtype=torch.int8), torch.full(x_shape, -128, dtype=torch.int8))):
            got = conv_codes_cpu(GemmKind.GRAD_WEIGHT, dy, x, geo)
            want = geo.bilinear(GemmKind.GRAD_WEIGHT, dy.double(), x.double())
            assert got.dtype == torch.int32 and torch.equal(got.double(), want)
    finally:
        int8_gemm.int8_gemm_provider.cache_clear()


@pytest.mark.parametrize("c_per_group", [1, 4])
def test_grouped_weight_gradients_make_no_call_per_group(c_per_group):
    """The weight gradient's op count does not grow with the number of groups: a call per
    group and kernel offset made a depthwise layer's wgrad 100-300x slower than fp32's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for groups in (8, 64):
        c = groups * c_per_group
        geo = ConvGeometry((1, 1), (1, 1), (1, 1), groups, (2, c, 6, 6), (c, c_per_group, 3, 3), (2, c, 6, 6))
        gen = torch.Generator().manual_seed(0)
        dy, x = _codes(geo.y_shape, gen), _codes(geo.x_shape, gen)
        with Count() as count:
            conv_codes_cpu(GemmKind.GRAD_WEIGHT, dy, x, geo)
        counts.append(count.ops)
    assert counts[0] == counts[1], counts
