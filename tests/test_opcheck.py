"""Every ``fqt::`` custom op passes ``torch.library.opcheck`` (schema, fake kernel against the
real one -- shapes, dtypes and strides --, autograd registration, AOT dispatch) over inputs in
every memory order a model produces: contiguous, channels-last, permuted, transposed, expanded
(stride 0), strided slices, 3-D. A fake whose strides differ from the real op's makes Inductor's
``assert_size_stride`` fail inside a user's model (a channels-last Hugging Face vision block did)."""

from __future__ import annotations

import pytest
import torch

from fqt_compiler import codegen  # noqa: F401  (registers the kernel-mode ops)
from fqt_compiler.memory_order import CodeLayout
from fqt_compiler.fusion_program import Program
from fqt_compiler.bhq import bhq_quantize_ref
from fqt_compiler.layout import Layout
from fqt_compiler.reference import quantize_ref
from fqt_compiler.specs import QuantSpec

fqt_ops = torch.ops.fqt
pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    four = torch.randn(2, 3, 4, 5, generator=g)
    return {
        "contiguous": torch.randn(6, 8, generator=g),
        "channels-last": four.to(memory_format=torch.channels_last),
        "permuted": four.permute(0, 2, 3, 1),
        "transposed": torch.randn(8, 6, generator=g).t(),
        "expanded": torch.randn(1, 8, generator=g).expand(6, 8),
        "slice": torch.randn(6, 16, generator=g)[:, ::2],
        "3-d": torch.randn(2, 5, 8, generator=g),
    }


INPUTS = _inputs()
SPECS = {
    "row": QuantSpec(granularity="row"),
    "column-sr": QuantSpec(granularity="column", rounding="stochastic"),
    "tensor-asym": QuantSpec(scheme="asym"),
    "fp8-row": QuantSpec(format="fp8_e4m3", granularity="row"),
}
BLOCK = QuantSpec(granularity="block", block_size=4)
BHQ = QuantSpec(transform="bhq", scheme="asym", granularity="row", rounding="stochastic", bits=8)
LAYOUTS = [Layout.DIM0, Layout.PENULTIMATE, Layout.LAST]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("name", INPUTS, ids=str)
def test_quantize_ops(name, spec, layout):
    x, s = INPUTS[name], SPECS[spec]
    reference = fqt_ops.quantize_stochastic.default if s.is_stochastic else fqt_ops.quantize.default
    for op in (reference, fqt_ops.quantize_kernel.default, fqt_ops.fake_quantize.default, fqt_ops.fake_quantize_kernel.default):
        torch.library.opcheck(op, (x, s.key(), int(layout)))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
@pytest.mark.parametrize("name", INPUTS, ids=str)
def test_block_and_bhq_ops(name, layout):
    x = INPUTS[name]
    for op in (fqt_ops.fake_quantize.default, fqt_ops.fake_quantize_kernel.default):
        torch.library.opcheck(op, (x, BLOCK.key(), int(layout)))
    for op in (fqt_ops.bhq_quantize.default, fqt_ops.bhq_quantize_kernel.default):
        torch.library.opcheck(op, (x, BHQ.key(), int(layout)))
    _, _, _, _, group, u, s = bhq_quantize_ref(x, BHQ, layout, seed=torch.tensor([1]))
    for op in (fqt_ops.bhq_inverse.default, fqt_ops.bhq_inverse_kernel.default):
        torch.library.opcheck(op, (x, group, u, s, int(layout)))


def _gemm_operands(a_t: bool, b_k_major: bool, affine: bool):
    """int8 codes of a (12 x 16) @ (16 x 10) GEMM, A stored row- or column-major, B K-major or not."""
    g = torch.Generator().manual_seed(1)
    spec = QuantSpec(scheme="asym" if affine else "sym", granularity="row")
    x = torch.randn(16, 12, generator=g).t() if a_t else torch.randn(12, 16, generator=g)
    w = torch.randn(10, 16, generator=g)
    qa = quantize_ref(x, spec, Layout.PENULTIMATE)
    qb = quantize_ref(w.t() if b_k_major else w.t().contiguous(), QuantSpec(granularity="row"), Layout.LAST)  # per column of B
    a = qa[0] if not a_t else qa[0].t().contiguous().t()
    b = qb[0] if b_k_major else qb[0].contiguous()
    za, oa = (qa[2], qa[3]) if affine else (None, None)
    return a, qa[1], za, oa, b, qb[1], None, None, torch.randn(10, generator=g)


@pytest.mark.parametrize("affine", [False, True], ids=["sym", "affine"])
@pytest.mark.parametrize("a_t", [False, True], ids=["A-row-major", "A-col-major"])
@pytest.mark.parametrize("b_k_major", [True, False], ids=["B-K-major", "B-N-major"])
def test_gemm_ops(a_t, b_k_major, affine):
    args = _gemm_operands(a_t, b_k_major, affine)
    for out_dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(fqt_ops.qmm.default, (*args, out_dtype))
    name = "float32"
    prog = Program((12, 10), (("mul", (("L", 0), 0.5), name, "none"), ("add", (("V", 0), ("L", 1)), name, "none")), 2)
    residual = torch.randn(10, 12).t()  # a leaf in another memory order
    torch.library.opcheck(fqt_ops.qmm_epilogue.default, (*args, torch.float32, [residual], prog.dumps()))
    quant = Program((12, 10), (("mul", (("L", 0), -2.0), name, "none"),), 1)
    for symmetric in (True, False):
        for columns in (False, True):
            torch.library.opcheck(fqt_ops.qmm_epilogue_stats.default,
                                  (*args, torch.float32, [residual], prog.dumps(), quant.dumps(), symmetric, columns, []))


@pytest.mark.parametrize("affine", [False, True], ids=["sym", "affine"])
@pytest.mark.parametrize("a_t", [False, True], ids=["A-row-major", "A-col-major"])
def test_batched_gemm_op(a_t, affine):
    """``fqt::qbmm`` on (3, 12, 16) @ (3, 16, 10) codes: A per (entry, row), stored row- or
    column-major per entry; B per column shared by the batch, K-major."""
    g = torch.Generator().manual_seed(2)
    spec = QuantSpec(scheme="asym" if affine else "sym", granularity="row")
    x = torch.randn(3, 16, 12, generator=g).transpose(1, 2) if a_t else torch.randn(3, 12, 16, generator=g)
    qa = quantize_ref(x, spec, Layout.PENULTIMATE)
    qb = quantize_ref(torch.randn(3, 10, 16, generator=g).transpose(1, 2), QuantSpec(granularity="column"), Layout.PENULTIMATE)
    za, oa = (qa[2], qa[3]) if affine else (None, None)
    for out_dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(fqt_ops.qbmm.default, (qa[0], qa[1], za, oa, qb[0], qb[1], None, None, out_dtype))


@pytest.mark.parametrize("code_layout", list(CodeLayout), ids=lambda c: c.name)
@pytest.mark.parametrize("name", ["contiguous", "transposed", "slice", "3-d", "expanded"])
def test_fused_quantize_op(name, code_layout):
    x = INPUTS[name]
    shape = tuple(x.shape)
    prog = Program(shape, (("mul", (("L", 0), 2.0), "float32", "none"), ("relu", (("V", 0),), "float32", "none")), 1)
    layout = Layout.PENULTIMATE
    for spec in (SPECS["row"], SPECS["column-sr"], SPECS["tensor-asym"]):
        for write_hp in (False, True):
            torch.library.opcheck(fqt_ops.fused_quantize.default,
                                  ([x], prog.dumps(), list(shape), spec.key(), int(layout), write_hp, int(code_layout)))


def test_monitor_ops():
    x = torch.randn(6, 5)
    spec = SPECS["row"]
    codes, scale, zp, offset = fqt_ops.quantize.default(x, spec.key(), int(Layout.PENULTIMATE))
    torch.library.opcheck(fqt_ops.monitor_codes.default, (x, codes, scale, zp, offset, spec.key()))
    torch.library.opcheck(fqt_ops.monitor_fake.default, (x, x.round()))
    torch.library.opcheck(fqt_ops.monitor_error.default, (x, x + 0.1))
    g = torch.randn(4, 3)
    torch.library.opcheck(fqt_ops.monitor_gradient.default, (g, g + 0.1, g - 0.1, g, -g, None, 0))


# (stride, padding, x shape, w shape, channels-last operands): a 3x3 image, a strided 1-D and a 3-D case
CONVS = [((1, 1), (1, 1), (2, 4, 5, 6), (3, 4, 3, 3), True), ((2, 2), (1, 0), (2, 4, 7, 6), (3, 4, 3, 2), False),
         ((2,), (1,), (2, 4, 9), (3, 4, 3), False), ((1, 1, 1), (1, 1, 1), (2, 2, 3, 4, 5), (3, 2, 3, 3, 3), True)]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"s{c[0]}x{c[2]}cl{c[4]}")
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["output", "grad_input", "grad_weight"])
def test_conv_ops(case, kind):
    """``fqt::conv_codes`` (a zero point oneDNN folds, one it cannot, none) and ``fqt::qconv``:
    the fakes' strides are the kernels' whatever order the codes come in."""
    from fqt_compiler.codegen.kernels.conv_cpu import onednn_available
    from fqt_compiler.conv import ConvGeometry
    from fqt_compiler.ops import CONV_KINDS

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN int8 convolution")
    stride, padding, x_shape, w_shape, channels_last = case
    n = len(x_shape) - 2
    y = torch.ops.aten.convolution(torch.zeros(x_shape), torch.zeros(w_shape), None, stride, padding, [1] * n, False,
                                   [0] * n, 1)
    gemm = CONV_KINDS[kind]
    geo = ConvGeometry(stride, padding, (1,) * n, 1, x_shape, w_shape, tuple(y.shape))
    a_shape, b_shape = geo.operand_shapes(gemm)
    g = torch.Generator().manual_seed(kind)
    a, b = (torch.randint(-128, 128, s, dtype=torch.int8, generator=g) for s in (a_shape, b_shape))
    if channels_last:
        fmt = torch.channels_last if n == 2 else torch.channels_last_3d
        a = a.contiguous(memory_format=fmt)
    geometry = (list(stride), list(padding), [1] * n, 1, list(geo.out_shape(gemm)))
    zeros = [None] if kind == 2 else [None, torch.tensor(-128.0), torch.tensor(0.5)]
    for zero in zeros:
        torch.library.opcheck(fqt_ops.conv_codes.default, (kind, a, b, zero, *geometry))
    sa, sb = torch.rand(()) + 0.1, torch.rand(()) + 0.1
    for zb in (None, torch.tensor(3.0)):
        args = (kind, a, sa, torch.tensor(-128.0), None, b, sb, zb, None, None, *geometry, torch.float32, channels_last)
        torch.library.opcheck(fqt_ops.qconv.default, args)


@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 4), (0, 5)], ids=str)
def test_hash_uniform_op(shape):
    torch.library.opcheck(fqt_ops.hash_uniform.default, (torch.tensor([11]), list(shape), torch.device("cpu")))
