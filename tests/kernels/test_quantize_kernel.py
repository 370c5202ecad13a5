"""The Triton quantize kernel equals reference.quantize_ref bit for bit (CPU: interpreter)."""

from __future__ import annotations

import pytest
import triton
import torch

from fqt_compiler.codegen.kernels.quantize import quantize
from fqt_compiler.grid import hash_uniform
from fqt_compiler.layout import Layout
from fqt_compiler.reference import quantize_ref
from fqt_compiler.specs import QuantSpec
from tests.helpers.device import DEVICE
from tests.helpers.kernel_cases import assert_same

SPECS = [
    QuantSpec(format="int", scheme="sym", granularity="row"),
    QuantSpec(format="int", scheme="sym", granularity="tensor", rounding="stochastic"),
    QuantSpec(format="int", scheme="asym", granularity="column", bits=4, rounding="stochastic"),
    QuantSpec(format="int", scheme="zog", granularity="tensor"),
    QuantSpec(format="int", scheme="asym", granularity="row", bits=2),
    QuantSpec(format="uint", scheme="zog", granularity="column", bits=5, rounding="stochastic"),
    QuantSpec(format="fp8_e4m3", granularity="row"),
    QuantSpec(format="fp8_e4m3", granularity="column", rounding="stochastic"),
    QuantSpec(format="fp8_e5m2", granularity="tensor", rounding="stochastic"),
]
# shapes not multiples of the 16 x 64 tiles, N = 1, batched 3-D operands in both layouts
CASES = [
    ((5, 70), Layout.DIM0), ((1, 9), Layout.PENULTIMATE), ((2, 3, 17), Layout.PENULTIMATE), ((2, 17, 3), Layout.LAST),
    ((33, 1), Layout.LAST),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short().replace(" ", "-"))
@pytest.mark.parametrize("shape,layout", CASES, ids=lambda c: str(c))
def test_quantize_kernel_matches_reference(spec, shape, layout):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(DEVICE)
    x.view(-1)[0] = 40.0  # one large value: clamping and scale paths
    seed = torch.tensor([321], dtype=torch.int64, device=DEVICE)
    assert_same(quantize(x, spec, layout, seed=seed), quantize_ref(x, spec, layout, seed=seed))


@pytest.mark.parametrize("fill", [0.0, 1e-30, 1e30, float("nan")], ids=["zeros", "tiny", "huge", "nan"])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3], SPECS[4], SPECS[6]], ids=lambda s: s.short().replace(" ", "-"))
def test_quantize_kernel_edge_values(spec, fill):
    x = torch.full((3, 20), fill, device=DEVICE)
    x[1] = torch.linspace(-2, 2, 20)  # one ordinary row next to the special ones
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    assert_same(quantize(x, spec, Layout.DIM0, seed=seed), quantize_ref(x, spec, Layout.DIM0))


@pytest.mark.parametrize("spec", [SPECS[6], SPECS[7], SPECS[8]], ids=lambda s: s.short().replace(" ", "-"))
def test_fp8_codes_keep_the_sign_of_values_that_round_to_zero(spec):
    """A negative value below half the smallest fp8 step is the code -0 (0x80), as torch's cast
    writes it, not +0: a 1000 x 777 normal sample holds a few such values, and on an H200 they
    were the only codes that differed from the reference's."""
    x = torch.tensor([[-1e-6, -3e-7, -0.0, 0.0, 2e-7, -0.5, 1.0, -2e-6] * 4] * 3, device=DEVICE)
    x[0] = 448.0  # every column's scale from one row: the others' values are tiny in it
    seed = torch.tensor([11], dtype=torch.int64, device=DEVICE)
    got, ref = quantize(x, spec, Layout.PENULTIMATE, seed=seed), quantize_ref(x, spec, Layout.PENULTIMATE, seed=seed)
    assert (ref[0].view(torch.uint8) == 0x80).any()  # the case is present
    assert_same(got, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_kernel_half_inputs(dtype):
    x = torch.randn(9, 13, device=DEVICE).to(dtype)
    spec = QuantSpec(scheme="asym", granularity="row")
    assert_same(quantize(x, spec, Layout.DIM0), quantize_ref(x, spec, Layout.DIM0))


def test_hash_uniform_is_reproducible_uniform_and_seed_dependent():
    seed = torch.tensor([99], device=DEVICE)
    a = hash_uniform(seed, (256, 256), DEVICE)
    assert torch.equal(a, hash_uniform(seed, (256, 256), DEVICE))
    assert a.min() >= 0 and a.max() < 1
    # moments of U[0, 1): mean 1/2, variance 1/12; and 16 equal-width bins are evenly filled
    assert abs(a.mean().item() - 0.5) < 0.005 and abs(a.var().item() - 1 / 12) < 0.002
    counts = torch.histc(a.cpu(), bins=16, min=0, max=1)
    assert (counts / a.numel() - 1 / 16).abs().max() < 0.004
    # neighbouring elements, and the same element under two seeds, are uncorrelated
    flat = a.flatten().double()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01
    b = hash_uniform(torch.tensor([100], device=DEVICE), (256, 256), DEVICE)
    assert abs(torch.corrcoef(torch.stack([flat, b.flatten().double()]))[0, 1].item()) < 0.01


@pytest.mark.parametrize("cols", [32, 37], ids=["even", "ragged"])
@pytest.mark.parametrize("spec", [
    QuantSpec(format="int", scheme="sym", granularity="block", block_size=8),
    QuantSpec(format="int", bits=4, scheme="asym", granularity="block", block_size=16, rounding="stochastic"),
    QuantSpec(format="fp8_e4m3", granularity="block", block_size=32),
], ids=lambda s: s.short().replace(" ", "-"))
def test_quantize_kernel_block_scales(spec, cols):
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(cols)).to(DEVICE) * 4
    seed = torch.tensor([3], device=DEVICE)
    assert_same(quantize(x, spec, Layout.DIM0, seed=seed), quantize_ref(x, spec, Layout.DIM0, seed=seed))


def test_quantize_kernel_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="transforms"):
        quantize(torch.randn(4, 4), QuantSpec(scheme="asym", granularity="row", transform="bhq"))
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        quantize(torch.randn(4, 4, dtype=torch.float64), QuantSpec())


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[2], SPECS[3]], ids=lambda s: s.short())
@pytest.mark.parametrize("shape,layout", [((0, 7), Layout.PENULTIMATE), ((6, 0), Layout.PENULTIMATE), ((2, 0, 5), Layout.LAST),
                                          ((0, 4), Layout.LAST)], ids=str)
def test_quantize_kernel_empty_inputs_match_the_reference(spec, shape, layout):
    """A batch of 0 (no rows) or rows of no elements: no launch, the reference's shapes and its
    zero statistics (regression: uninitialized scales, reshapes of a 1-element buffer)."""
    x = torch.randn(shape, device=DEVICE)
    seed = torch.tensor([3], device=DEVICE)
    got, ref = quantize(x, spec, layout, seed=seed), quantize_ref(x, spec, layout, seed=seed)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype and torch.equal(g, r)


def test_gpu_row_tilings_hold_at_most_32_elements_a_thread_and_long_rows_choose_their_chunks():
    """The configs the autotuner gets on a GPU (nothing launched): one-pass tiles of at most 32
    elements a thread (the plain quantizer up to 16384-wide rows, generated kernels up to
    4096), and for longer rows chunk shapes of both kinds: wide for rows contiguous in memory,
    tall for transposed reads, each config naming its own BLOCK_C."""
    from fqt_compiler.codegen.kernels import quantize as qk

    cuda = torch.device("cuda")
    for n_cols in (16, 100, 1024, 4096, 8192, 16384):
        configs, block_c, one_pass = qk.rows_tiling(n_cols, cuda, qk.PLAIN_ONE_PASS_MAX_C)
        assert one_pass and block_c >= n_cols and configs
        for c in configs:
            assert "BLOCK_C" not in c.kwargs and c.kwargs["BLOCK_R"] * block_c <= 32 * 32 * c.num_warps, (n_cols, c)
    assert not qk.rows_tiling(8192, cuda)[2]  # a generated kernel's limit
    configs, block_c, one_pass = qk.rows_tiling(qk.PLAIN_ONE_PASS_MAX_C + 1, cuda, qk.PLAIN_ONE_PASS_MAX_C)
    assert not one_pass and block_c is None
    shapes = {(c.kwargs["BLOCK_R"], c.kwargs["BLOCK_C"]) for c in configs}
    assert any(r == 1 and c >= 1024 for r, c in shapes) and any(r >= 16 for r, c in shapes)


@pytest.mark.parametrize("cols", [100, 16385])
@pytest.mark.parametrize("spec", [QuantSpec(granularity="row", rounding="stochastic"), QuantSpec(scheme="asym", bits=4)],
                         ids=lambda s: s.short().replace(" ", "-"))
def test_rows_longer_than_a_tile_take_two_passes_same_bits(monkeypatch, spec, cols):
    """A row that fits one tile is read once; a longer one (here: past a lowered threshold, and
    past the real one) is read in two passes of chunks. Both give the reference's bits."""
    from fqt_compiler.codegen.kernels import quantize as qk

    if cols < qk.PLAIN_ONE_PASS_MAX_C:
        monkeypatch.setattr(qk, "PLAIN_ONE_PASS_MAX_C", 32)
    assert not qk.rows_tiling(cols, torch.device(DEVICE), qk.PLAIN_ONE_PASS_MAX_C)[2]
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(cols)).to(DEVICE)
    seed = torch.tensor([4], device=DEVICE)
    got = qk.quantize(x, spec, Layout.PENULTIMATE, seed=seed)
    assert_same(got, quantize_ref(x, spec, Layout.PENULTIMATE, seed=seed))


@pytest.mark.parametrize("scheme", ["asym", "zog"])
def test_a_range_wider_than_float32_max_keeps_a_finite_grid(scheme):
    """Rows spanning -3e38..3e38: max - min overflows float32, the grid's step must not (it is
    computed from halves, which also makes it immune to a compiler's fused multiply-adds)."""
    x = torch.tensor([[-3e38, 3e38, 1.0, -2.0], [0.5, -0.25, 2.0, 1.0]]).to(DEVICE)
    spec = QuantSpec(scheme=scheme, granularity="row")
    got = quantize(x, spec, Layout.PENULTIMATE)
    ref = quantize_ref(x, spec, Layout.PENULTIMATE)
    assert_same(got, ref)
    assert torch.isfinite(ref[1]).all() and (ref[1] > 0).all()


@pytest.mark.parametrize("n_cols,one_pass_max", [(64, None), (768, None), (4096, None), (16384, 16384), (20000, None)])
def test_gpu_row_tilings_for_a_known_shape_keep_one_tile_and_its_warp_counts(n_cols, one_pass_max):
    """Given the row count, a GPU launch autotunes over warp counts of one tile shape, chosen
    from the full candidate list: the tallest one-pass tile that still gives two waves of
    programs (else the shortest); wide chunks for contiguous long rows, tall ones for a
    transposed read. Every config costs a compile and a benchmark per shape."""
    from fqt_compiler.codegen.kernels import quantize as qk

    cuda = torch.device("cuda")
    full, block_c, one_pass = qk.rows_tiling(n_cols, cuda, one_pass_max)
    every = {(tuple(sorted(c.kwargs.items())), c.num_warps) for c in full}
    shapes = {}
    for n_rows, col_stride in ((10**6, 1), (7, 1), (10**6, 10**6)):
        configs, bc, op = qk.rows_tiling(n_cols, cuda, one_pass_max, n_rows, col_stride)
        assert (bc, op) == (block_c, one_pass) and 1 <= len(configs) <= 2
        assert {(tuple(sorted(c.kwargs.items())), c.num_warps) for c in configs} <= every
        tiles = {(c.kwargs["BLOCK_R"], c.kwargs.get("BLOCK_C", block_c)) for c in configs}
        assert len(tiles) == 1
        shapes[(n_rows, col_stride)] = tiles.pop()
    many, few, transposed = shapes[(10**6, 1)], shapes[(7, 1)], shapes[(10**6, 10**6)]
    assert triton.cdiv(10**6, many[0]) >= qk.WAVE_PROGRAMS and few[0] <= many[0]
    if one_pass:
        heights = sorted({c.kwargs["BLOCK_R"] for c in full})
        assert few[0] == heights[0] and transposed == many
    else:
        assert few[1] >= 1024 and many[1] >= 1024 and transposed == (16, 64)


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 3, 2, 5, 4), (4, 7, 9)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("spec", [QuantSpec(granularity="row", rounding="stochastic"), QuantSpec(granularity="tensor"),
                                  QuantSpec(granularity="row", scheme="asym", bits=5, rounding="stochastic"),
                                  QuantSpec(format="fp8_e4m3", granularity="row")], ids=lambda s: s.short().replace(" ", "-"))
@pytest.mark.parametrize("two_pass", [False, True], ids=["one-pass", "two-pass"])
def test_channels_last_inputs_quantize_in_their_memory_order_same_bits(monkeypatch, spec, shape, two_pass):
    """A channels-last activation or gradient quantized per sample or per tensor is read and
    its codes written in its own memory order (no copy to the natural order and back), with
    the reference's bits: the random stream is drawn at each element's natural index."""
    from fqt_compiler.codegen.kernels import quantize as qk

    if two_pass:  # rows longer than a tile (the threshold lowered): chunks in memory order
        monkeypatch.setattr(qk, "PLAIN_ONE_PASS_MAX_C", 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 3
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    x = (x.to(memory_format=fmt) if fmt else x.transpose(1, 2).contiguous().transpose(1, 2)).to(DEVICE)
    assert not x.is_contiguous() and x.movedim(1, -1).is_contiguous()
    seed = torch.tensor([11], device=DEVICE)
    got = quantize(x, spec, Layout.DIM0, seed=seed)
    assert got[0].stride() == x.stride()  # the input's memory order, written in place
    assert_same(got, quantize_ref(x, spec, Layout.DIM0, seed=seed))
    assert_same(quantize(x.contiguous(), spec, Layout.DIM0, seed=seed), got)
