"""The Triton convolution GEMMs (implicit GEMM for fprop and dgrad, the GEMM kernel per kernel
offset for wgrad) against the fp64 convolution of the codes under Triton's interpreter: bit for
bit for int8, to fp32 accumulation round-off for fp8; and the implicit-GEMM kernel compiled for
sm_90 by the real compiler (no GPU needed), with ptxas's register and spill report."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fqt_compiler.codegen.kernels.conv import conv_codes_triton
from fqt_compiler.conv import ConvGeometry, qconv_ref
from fqt_compiler.grid import QOperand
from fqt_compiler.ops import CONV_KINDS, qconv_triton
from fqt_compiler.specs import GemmKind
from tests.helpers.device import DEVICE
from tests.helpers.sm90 import compile_without_interpreter
from tests.kernels.test_conv_kernels import geometries

KINDS = list(CONV_KINDS)


def _codes(shape, dtype, gen):
    if dtype == torch.int8:
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen).to(DEVICE)
    return (torch.randn(shape, generator=gen) * 8).to(dtype).to(DEVICE)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geo=geometries(), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_int8_triton_convolutions_equal_the_integer_convolution(geo, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    a_shape, b_shape = geo.operand_shapes(kind)
    a, b = _codes(a_shape, torch.int8, gen), _codes(b_shape, torch.int8, gen)
    got = conv_codes_triton(kind, a, b, geo).cpu()
    want = geo.bilinear(kind, a.cpu().double(), b.cpu().double())
    assert got.shape == want.shape and torch.equal(got, want.float())


@pytest.mark.parametrize("geo", [ConvGeometry((1,), (0,), (1,), 1, (2, 2, 2), (1, 2, 1), (2, 1, 2)),
                                 ConvGeometry((1,), (1,), (1,), 2, (3, 4, 5), (2, 2, 3), (3, 2, 5)),
                                 ConvGeometry((1, 1), (0, 0), (1, 1), 1, (2, 3, 1, 2), (2, 3, 1, 1), (2, 2, 1, 2))],
                         ids=["1d-1x1", "1d-grouped", "2d-1x1"])
def test_int8_weight_gradient_of_small_convolutions(geo):
    """A weight gradient whose stacked windows torch.cat lays out channels-last (a 1-D
    convolution's 4-D windows with a unit dim): the im2col columns are re-viewed by shape."""
    gen = torch.Generator().manual_seed(3)
    a_shape, b_shape = geo.operand_shapes(GemmKind.GRAD_WEIGHT)
    a, b = _codes(a_shape, torch.int8, gen), _codes(b_shape, torch.int8, gen)
    got = conv_codes_triton(GemmKind.GRAD_WEIGHT, a, b, geo).cpu()
    assert torch.equal(got, geo.bilinear(GemmKind.GRAD_WEIGHT, a.cpu().double(), b.cpu().double()).float())


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize("pair", [(torch.float8_e4m3fn, torch.float8_e4m3fn), (torch.float8_e5m2, torch.float8_e4m3fn)],
                         ids=["e4m3xe4m3", "e5m2xe4m3"])
def test_fp8_triton_convolutions_accumulate_in_fp32(kind, pair):
    gen = torch.Generator().manual_seed(11)
    geo = ConvGeometry((2, 1), (1, 1), (1, 2), 2, (2, 8, 7, 9), (6, 4, 3, 3), (2, 6, 4, 5))
    a_shape, b_shape = geo.operand_shapes(kind)
    a, b = _codes(a_shape, pair[0], gen), _codes(b_shape, pair[1], gen)
    got = conv_codes_triton(kind, a, b, geo).cpu().double()
    want = geo.bilinear(kind, a.cpu().double(), b.cpu().double())
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_qconv_triton_launcher_equals_the_reference(kind):
    """The op's CUDA body (kernels, then the shared epilogue) on the paper's forward layout:
    zero points and offsets, per-tensor scales; channels-last result where asked."""
    gen = torch.Generator().manual_seed(12)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), 1, (2, 4, 6, 6), (5, 4, 3, 3), (2, 5, 6, 6))
    a_shape, b_shape = geo.operand_shapes(kind)
    a = QOperand(_codes(a_shape, torch.int8, gen).cpu(), torch.tensor(0.03), torch.tensor(-128.0), torch.tensor(-0.4))
    b = QOperand(_codes(b_shape, torch.int8, gen).cpu(), torch.tensor(0.01), torch.tensor(3.0))
    out_shape = list(geo.out_shape(kind))
    got = qconv_triton(KINDS.index(kind), *(t.to(DEVICE) if t is not None else None for t in a),
                       *(t.to(DEVICE) if t is not None else None for t in b), None, list(geo.stride), list(geo.padding),
                       list(geo.dilation), geo.groups, out_shape, torch.float32, kind is not GemmKind.GRAD_WEIGHT).cpu()
    want = qconv_ref(kind, a, b, geo, None, torch.float32, kind is not GemmKind.GRAD_WEIGHT)
    assert got.stride() == want.stride()
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


_COMPILE_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from fqt_compiler.codegen.kernels.conv import conv_kernel, SM90_CONFIG as C
from fqt_compiler.tools.ptx import ptxas_usage

names = list(conv_kernel.arg_names)
for is_int, codes in ((True, "*i8"), (False, "*fp8e4nv")):
    const = dict(IS_INT=is_int, BLOCK_M=C["BLOCK_M"], BLOCK_N=C["BLOCK_N"], BLOCK_C=C["BLOCK_C"], sxc=1, swc=1, sok=1)
    sig = {n: ("constexpr" if n in const else codes if n in ("x_ptr", "w_ptr") else "*fp32" if n == "out_ptr" else "i32")
           for n in names}
    out = triton.compile(triton.compiler.ASTSource(fn=conv_kernel, signature=sig, constexprs=const),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=C["num_warps"], num_stages=C["num_stages"]))
    usage = ptxas_usage(out.asm["ptx"])
    print("PTX", codes, usage["registers"], usage["spill_bytes"])
"""


def test_implicit_gemm_kernel_compiles_for_sm90_without_spills():
    stdout = compile_without_interpreter(_COMPILE_SM90)
    lines = [line.split() for line in stdout.splitlines() if line.startswith("PTX")]
    assert len(lines) == 2, stdout
    for _, codes, registers, spills in lines:
        assert int(registers) > 0 and int(spills) == 0, (codes, registers, spills)


@pytest.mark.parametrize("groups, per_group", [(8, 1), (3, 2), (2, 16)], ids=["depthwise", "small-groups", "gemm-groups"])
def test_grouped_weight_gradients_equal_the_integer_convolution(groups, per_group):
    """Small groups' wgrad is one batched GEMM per kernel offset (not a launch per group),
    groups of at least GROUP_GEMM_MIN channels the Triton GEMM per group: both the exact
    integer sums, over more than 1024 output positions, random and worst codes."""
    c = groups * per_group
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), groups, (2, c, 24, 24), (c, per_group, 3, 3), (2, c, 24, 24))
    gen = torch.Generator().manual_seed(groups)
    for dy, x in ((_codes(geo.y_shape, torch.int8, gen), _codes(geo.x_shape, torch.int8, gen)),
                  (torch.full(geo.y_shape, -128, dtype=torch.int8, device=DEVICE),
                   torch.full(geo.x_shape, -128, dtype=torch.int8, device=DEVICE))):
        got = conv_codes_triton(GemmKind.GRAD_WEIGHT, dy, x, geo).cpu()
        want = geo.bilinear(GemmKind.GRAD_WEIGHT, dy.cpu().double(), x.cpu().double())
        assert torch.equal(got, want.float())
