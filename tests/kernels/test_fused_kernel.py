"""Generated prologue-fused quantize kernels (``codegen/kernels/fused.py``) against the unfused
path (the chain op by op in eager torch, then ``reference.quantize_ref``), under Triton's
interpreter; and the generated source compiled for sm_90 (no GPU needed to compile)."""

from __future__ import annotations

import pytest
import torch

from fqt_compiler.fusion_program import Program, run_reference
from fqt_compiler.codegen.kernels.fused import fused_quantize
from fqt_compiler.layout import Layout
from fqt_compiler.reference import quantize_ref
from fqt_compiler.specs import ElementFormat, Granularity, QuantSpec, Rounding, Scheme
from tests.helpers.device import DEVICE
from tests.helpers.sm90 import compile_without_interpreter

SPECS = [
    QuantSpec(bits=8, granularity=Granularity.ROW),
    QuantSpec(bits=8, granularity=Granularity.COLUMN, scheme=Scheme.ASYMMETRIC),
    QuantSpec(bits=4, granularity=Granularity.TENSOR, scheme=Scheme.ZERO_ON_GRID),
    QuantSpec(bits=8, granularity=Granularity.ROW, rounding=Rounding.STOCHASTIC),
    QuantSpec(bits=8, granularity=Granularity.TENSOR, rounding=Rounding.STOCHASTIC),
    QuantSpec(format=ElementFormat.FP8_E4M3, granularity=Granularity.ROW),
]

# (a + bias) * 2, relu, + residual: exactly rounded ops only
EXACT = Program(
    (3, 5, 24),
    (("add", (("L", 0), ("L", 1)), "float32", "none"), ("mul", (("V", 0), 2.0), "float32", "none"),
     ("relu", (("V", 1),), "float32", "none"), ("add", (("V", 2), ("L", 2)), "float32", "none")),
    3,
)


def _leaves(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(DEVICE, dtype) for shape in ((3, 5, 24), (24,), (3, 5, 24))]


def _both(program, leaves, spec, layout, view_shape, write_hp=True):
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    fused = fused_quantize(leaves, program, view_shape, spec, layout, write_hp, seed=seed)
    x = run_reference(program, leaves).reshape(view_shape)
    ref = quantize_ref(x, spec, layout, seed=seed)
    return fused, (*ref, x)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("layout,view", [(Layout.PENULTIMATE, (15, 24)), (Layout.LAST, (3, 5, 24)), (Layout.DIM0, (3, 5, 24))])
def test_fused_codes_equal_the_unfused_path_bit_for_bit(spec, layout, view):
    fused, ref = _both(EXACT, _leaves(), spec, layout, view)
    for name, a, b in zip(("codes", "scale", "zero point", "offset", "high precision"), fused, ref):
        assert a.shape == b.shape, name
        assert torch.equal(
            a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
            b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b,
        ), name


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[3], SPECS[4]], ids=lambda s: s.short())
def test_rows_longer_than_a_tile_take_two_passes_same_bits(monkeypatch, spec):
    """Rows that fit one tile run the chain once; longer rows (here: past a lowered threshold)
    run it in a statistics pass and a codes pass over chunks. Same bits either way."""
    from fqt_compiler.codegen.kernels import quantize as qk

    monkeypatch.setattr(qk, "ONE_PASS_MAX_C", 8)
    fused, ref = _both(EXACT, _leaves(), spec, Layout.PENULTIMATE, (15, 24))
    for name, a, b in zip(("codes", "scale", "zero point", "offset", "high precision"), fused, ref):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_chain_rounds_every_op_like_eager(dtype):
    name = str(dtype).split(".")[1]
    prog = Program((3, 5, 24), tuple((op, ops, name, "none") for op, ops, _, _ in EXACT.steps), 3)
    leaves = _leaves(dtype)
    leaves[0][0, 0, :3] = torch.tensor([6e4, -6e4, 1e-6]).to(dtype)  # overflow (fp16) and subnormal results
    fused, ref = _both(prog, leaves, SPECS[0], Layout.PENULTIMATE, (15, 24))
    assert torch.equal(fused[0], ref[0]) and torch.equal(fused[1], ref[1]) and torch.equal(fused[4], ref[4])


def test_no_high_precision_output_unless_asked():
    fused, _ = _both(EXACT, _leaves(), SPECS[0], Layout.PENULTIMATE, (15, 24), write_hp=False)
    assert fused[4].numel() == 0


@pytest.mark.parametrize(
    "steps",
    [
        (("gelu", (("L", 0),), "float32", "none"),),
        (("gelu", (("L", 0),), "float32", "tanh"),),
        (("silu", (("L", 0),), "float32", "none"), ("add", (("V", 0), ("L", 1)), "float32", "none")),
        (("gelu_backward", (("L", 2), ("L", 0)), "float32", "none"),),
        (("gelu_backward", (("L", 2), ("L", 0)), "float32", "tanh"),),
        (("tanh", (("L", 0),), "float32", "none"), ("sigmoid", (("V", 0),), "float32", "none")),
    ],
    ids=["gelu", "gelu-tanh", "silu-add", "gelu-bwd", "gelu-tanh-bwd", "tanh-sigmoid"],
)
def test_transcendental_chains_agree_to_the_last_ulp(steps):
    """exp / erf / tanh are not correctly rounded anywhere: a code may move by one step where
    the value sits on a rounding boundary, nowhere else."""
    prog = Program((3, 5, 24), steps, 3)
    fused, ref = _both(prog, _leaves(), SPECS[0], Layout.PENULTIMATE, (15, 24))
    torch.testing.assert_close(fused[4], ref[4], rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(fused[1], ref[1], rtol=2e-6, atol=0)
    moved = (fused[0].int() - ref[0].int()).abs()
    assert moved.max() <= 1 and moved.float().mean() < 0.01


def test_nan_and_inf_in_a_leaf_propagate():
    leaves = _leaves()
    leaves[0][0, 0, 3] = float("nan")
    leaves[0][1, 2, 5] = float("inf")
    fused, ref = _both(EXACT, leaves, SPECS[0], Layout.PENULTIMATE, (15, 24))
    assert torch.equal(fused[0], ref[0])
    assert torch.equal(fused[1].isnan(), ref[1].isnan()) and fused[1].isnan().any()


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from fqt_compiler.fusion_program import Program
from fqt_compiler.codegen.kernels.fused import _module

EXACT = Program(
    (3, 5, 24),
    (("add", (("L", 0), ("L", 1)), "float32", "none"), ("mul", (("V", 0), 2.0), "float32", "none"),
     ("relu", (("V", 1),), "float32", "none"), ("add", (("V", 2), ("L", 2)), "float32", "none")),
    3,
)

module = _module(EXACT)
sig = {f"in{i}_ptr": "*fp32" for i in range(3)}
sig.update({"hp_ptr": "*fp32", "codes_ptr": "*i8", "codes2_ptr": "*i8", "scale_ptr": "*fp32", "zp_ptr": "*fp32",
            "offset_ptr": "*fp32", "stats_ptr": "*fp32", "seed_ptr": "*i64", "R": "i32", "C": "i32"})
sig.update({f"{p}{i}{a}": "i32" for i in range(3) for d in "rc"
            for p, a in (("s", d), (d, "n1"), (d, "n2"), (d, "n3"), (d, "t1"), (d, "t2"), (d, "t3"))})
sig.update({f"{o}{d}{a}": "i32" for o in "hc" for d in "rc" for a in ("0", "n1", "n2", "n3", "t1", "t2", "t3")})
sig.update({k: "i32" for k in ("stride_c2r", "stride_c2c")})
# leaf 1 broadcast along a row's outer dims, leaf 2 read over four column dims; channels-last
# codes and high-precision value of per-sample rows
dims = dict(RD0=1, CD0=1, RD1=1, CD1=2, RD2=2, CD2=4, HRD=1, HCD=2, CRD=1, CCD=2)
for one_pass, block_c in ((False, 64), (True, 1024)):
    const = dict(SCHEME=0, FP8=0, STOCHASTIC=True, STATS_GIVEN=False, QMAX=127.0, LEVELS=255, CODE_OFFSET=0,
                 FP8_MANT=3, FP8_EMIN=-6, WRITE_HP=True, WRITE_CODES2=True, ONE_PASS=one_pass, BLOCK_R=4, BLOCK_C=block_c,
                 **dims)
    sig.update({k: "constexpr" for k in const})
    out = triton.compile(triton.compiler.ASTSource(fn=module.rows_kernel, signature=sig, constexprs=const),
                         target=GPUTarget("cuda", 90, 32))
    print("PTX" if "ptx" in out.asm else "NO PTX", "CUBIN" if out.asm.get("cubin") else "NO CUBIN")

import torch
from fqt_compiler.fusion_program import Program
from fqt_compiler.codegen.kernels.fused import load_source
from fqt_compiler.codegen.kernels.qmm_fused import generate_epilogue_source

prog = Program((8, 16), (("mul", (("L", 0), 0.5), "bfloat16", "none"), ("add", (("V", 0), ("L", 1)), "bfloat16", "none"),
                         ("gelu", (("V", 1),), "bfloat16", "tanh")), 2)
quant = Program((8, 16), (("gelu_backward", (("L", 0), ("L", 1)), "bfloat16", "none"),), 2)
kernel = load_source(generate_epilogue_source(prog, torch.bfloat16, quant)).qmm_epilogue_kernel
sig = {k: "*i8" for k in ("a_ptr", "b_ptr")}
sig.update({k: "*fp32" for k in ("sa_ptr", "sb_ptr", "za_ptr", "zb_ptr", "oa_ptr", "ob_ptr", "bias_ptr", "part_ptr")})
sig.update({"out_ptr": "*bf16", "in1_ptr": "*bf16", "qin1_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32"})
sig.update({k: "i32" for k in ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_om", "stride_on", "stride_sa",
                               "stride_sb", "s1r", "s1c", "qs1r", "qs1c", "stride_pm")})
for columns in (False, True):
    const = dict(IS_INT=True, AFFINE=True, HAS_BIAS=True, SYMMETRIC=False, COLUMNS=columns, EVEN_K=False, BLOCK_M=128,
                 BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    sig.update({k: "constexpr" for k in const})
    order = ["a_ptr", "b_ptr", "out_ptr", "sa_ptr", "sb_ptr", "za_ptr", "zb_ptr", "oa_ptr", "ob_ptr", "bias_ptr", "in1_ptr",
             "qin1_ptr", "part_ptr", "M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_om", "stride_on",
             "stride_sa", "stride_sb", "s1r", "s1c", "qs1r", "qs1c", "stride_pm", *const]
    out = triton.compile(triton.compiler.ASTSource(fn=kernel, signature={k: sig[k] for k in order}, constexprs=const),
                         target=GPUTarget("cuda", 90, 32))
print("EPILOGUE-PTX" if "ptx" in out.asm else "NO EPILOGUE PTX")
"""


@pytest.mark.slow
def test_generated_kernels_compile_for_sm90():
    """The interpreter is lenient; the real compiler (to PTX and, with ptxas, a cubin) is not.
    Compiling needs no GPU; it runs without the interpreter, in a subprocess."""
    stdout = compile_without_interpreter(_COMPILE_SM90)
    assert "PTX" in stdout.split() and "EPILOGUE-PTX" in stdout.split()


# ------------------------------------------------------------------ epilogue-fused GEMMs
@pytest.mark.parametrize("pair", ["int8-sym-row", "paper-asym-zog-tensor"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_epilogue_fused_gemm_equals_gemm_then_consumers(pair, out_dtype):
    """qmm -> (* 0.5, + residual, relu) in one generated kernel, against the GEMM stored in its
    dtype and the consumers op by op: bit for bit."""
    from fqt_compiler.codegen.kernels.qmm_fused import qmm_fused
    from fqt_compiler.reference import qmm_ref
    from tests.helpers.kernel_cases import PAIRS, qmm_operands

    args, _ = qmm_operands(33, 70, 40, *PAIRS[pair], DEVICE)
    name = str(out_dtype).split(".")[1]
    residual = torch.randn(3, 11, 40, generator=torch.Generator().manual_seed(5)).to(DEVICE, out_dtype)
    prog = Program(
        (3, 11, 40),
        (("mul", (("L", 0), 0.5), name, "none"), ("add", (("V", 0), ("L", 1)), name, "none"),
         ("relu", (("V", 1),), name, "none")),
        2,
    )
    got = qmm_fused(*args, out_dtype, [residual], prog)
    gemm = qmm_ref(*args, out_dtype=out_dtype).view(3, 11, 40)
    want = run_reference(prog, [gemm, residual])
    assert got.dtype == want.dtype and torch.equal(got.view(3, 11, 40), want)


@pytest.mark.parametrize("exponent", [2.0, 3.0, -1.0, 4.0, 0.5, -0.5, 1.5, 0.0])
def test_pow_with_a_negative_base_follows_torch(exponent):
    """Regression: pow through exp2(y log2 x) turned every negative base into NaN (RMSNorm's
    backward raises to integer powers)."""
    prog = Program((3, 5, 24), (("pow", (("L", 0), exponent), "float32", "none"),), 3)
    leaves = _leaves()
    fused, ref = _both(prog, leaves, SPECS[0], Layout.PENULTIMATE, (15, 24))
    assert torch.equal(fused[4].isnan(), ref[4].isnan())
    finite = ref[4].isfinite()
    torch.testing.assert_close(fused[4][finite], ref[4][finite], rtol=1e-6, atol=0)


# ------------------------------------------------------------------ code layouts
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[2]], ids=lambda s: s.short())
@pytest.mark.parametrize("layout,view", [(Layout.PENULTIMATE, (15, 24)), (Layout.PENULTIMATE, (3, 5, 24)),
                                         (Layout.LAST, (15, 24)), (Layout.DIM0, (15, 24))])
def test_codes_in_every_memory_order_hold_the_same_values(spec, layout, view):
    """COLUMN_MAJOR writes the codes column by column (strides of a transposed buffer); BOTH
    writes natural codes and a column-major copy from the same registers. Values never change."""
    from fqt_compiler.memory_order import CodeLayout

    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    base = fused_quantize(_leaves(), EXACT, view, spec, layout, True, seed=seed)
    col = fused_quantize(_leaves(), EXACT, view, spec, layout, True, code_layout=CodeLayout.COLUMN_MAJOR, seed=seed)
    both = fused_quantize(_leaves(), EXACT, view, spec, layout, False, code_layout=CodeLayout.BOTH, seed=seed)
    rows = 1
    for d in view[:-1]:
        rows *= d
    # the leading dimension padded to 16 bytes where a GEMM reads the codes (PENULTIMATE, 2-D)
    padded = layout is Layout.PENULTIMATE or len(view) == 2
    lead_nat, lead_col = (32, 16) if padded else (view[-1], rows)  # 24 -> 32 and 15 -> 16 int8 codes
    assert base[0].reshape(rows, view[-1]).stride() == (lead_nat, 1) and base[5].numel() == 0
    assert col[0].reshape(rows, view[-1]).stride() == (1, lead_col)  # the GEMM reading it transposed reads K-major
    assert both[0].reshape(rows, view[-1]).stride() == (lead_nat, 1)
    assert both[5].reshape(rows, view[-1]).stride() == (1, lead_col)
    for out in (col[0], both[0], both[5]):
        assert torch.equal(out, base[0])
    for i in (1, 2, 3):
        assert torch.equal(col[i], base[i]) and torch.equal(both[i], base[i])
    assert torch.equal(col[4], base[4]) and both[4].numel() == 0


def test_column_major_codes_without_a_strided_grouped_view_are_written_in_place():
    """Column-major codes of a 3-D tensor grouped along its last dim have no strided grouped
    matrix: the kernel writes them through their dims (two for the rows), same values."""
    from fqt_compiler.memory_order import CodeLayout, column_major_ok

    assert not column_major_ok((3, 5, 24), Layout.LAST) and not column_major_ok((3, 5, 24), Layout.DIM0)
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    base = fused_quantize(_leaves(), EXACT, (3, 5, 24), SPECS[0], Layout.LAST, False, seed=seed)
    col = fused_quantize(_leaves(), EXACT, (3, 5, 24), SPECS[0], Layout.LAST, False, code_layout=CodeLayout.COLUMN_MAJOR,
                         seed=seed)
    assert col[0].stride() == (5, 1, 15) and torch.equal(col[0], base[0])


_PTX_LAYOUTS = """
from fqt_compiler.tools.ptx import operand_loads
print(*(operand_loads(a, b)["cp.async"] for a, b in ((True, True), (True, False), (False, True))))
print(*(operand_loads(a, b)["prmt"] for a, b in ((True, True), (True, False))))
"""


def test_sm90_qmm_copies_k_major_operands_asynchronously_only():
    """Why codes are written K-major (codegen/code_layout.py): compiled for sm_90, the int8 GEMM
    copies a K-major operand into shared memory with cp.async; an operand that is not K-major
    goes through registers (byte permutes, synchronous shared stores) on every K step."""
    stdout = compile_without_interpreter(_PTX_LAYOUTS)
    both_k, b_not_k, a_not_k = map(int, stdout.split("\n")[0].split())
    prmt_k, prmt_not_k = map(int, stdout.split("\n")[1].split())
    assert both_k > 0 and both_k == 2 * b_not_k == 2 * a_not_k, stdout
    assert prmt_k == 0 < prmt_not_k, stdout


@pytest.mark.parametrize("op", ["sigmoid", "exp", "div"])
@pytest.mark.parametrize("granularity", [Granularity.ROW, Granularity.TENSOR], ids=lambda g: g.value)
def test_padding_lanes_never_reach_the_statistics(op, granularity):
    """Regression: a row shorter than the kernel's tile leaves padding lanes holding the chain
    of 0 -- sigmoid(0) = 0.5, exp(0) = 1, 0 / 0 = NaN -- which once set the symmetric amax
    (and the NaN flag) of rows whose real values are all tiny."""
    steps = (("div", (("L", 0), ("L", 1)), "float32", "none"),) if op == "div" else ((op, (("L", 0),), "float32", "none"),)
    prog = Program((5, 24), steps, 2 if op == "div" else 1)
    x = torch.full((5, 24), -20.0 if op != "div" else 1e-12, device=DEVICE)
    leaves = [x, torch.full((5, 24), 3.0, device=DEVICE)] if op == "div" else [x]
    spec = QuantSpec(bits=8, granularity=granularity)
    out = fused_quantize(leaves, prog, (5, 24), spec, Layout.PENULTIMATE, False, block_c=64)
    ref = quantize_ref(run_reference(prog, leaves), spec, Layout.PENULTIMATE)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=0)  # exp: last-ulp differences only
    assert (out[0].int() - ref[0].int()).abs().max() <= 1


# ------------------------------------------------------------------ statistics from the GEMM epilogue
@pytest.mark.parametrize("pair", ["int8-sym-row", "paper-asym-zog-tensor"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("columns", [False, True], ids=["per-row", "per-column"])
@pytest.mark.parametrize("other_leaf", [False, True], ids=["one-leaf", "two-leaves"])
def test_epilogue_statistics_equal_the_quantizers_own(pair, out_dtype, symmetric, columns, other_leaf):
    """The epilogue applies the next quantizer's chain to each stored tile and keeps per-row
    (or per-column) partial statistics; reduced over the slots they are exactly the
    quantizer's statistics pass (33 x 70 leaves ragged last tiles whose padding the chain maps
    to -3)."""
    from fqt_compiler.fusion_program import reference_partials
    from fqt_compiler.codegen.kernels.qmm_fused import qmm_fused
    from tests.helpers.kernel_cases import PAIRS, qmm_operands

    args, _ = qmm_operands(33, 40, 70, *PAIRS[pair], DEVICE)
    name = str(out_dtype).split(".")[1]
    prog = Program((33, 70), (("convert", (("L", 0),), name, "none"),), 1)
    steps = (("add", (("L", 0), 1.5), name, "none"), ("mul", (("V", 0), -2.0), name, "none"))
    qleaves = []
    if other_leaf:  # e.g. an activation's derivative: the saved input, loaded at the tile
        steps += (("mul", (("V", 1), ("L", 1)), name, "none"),)
        qleaves = [torch.randn(70, 33, generator=torch.Generator().manual_seed(6)).to(DEVICE, out_dtype).t()]  # any strides
    quant = Program((33, 70), steps, 2 if other_leaf else 1)
    out, partials = qmm_fused(*args, out_dtype, [], prog, quant, symmetric, columns, qleaves)
    value = run_reference(quant, [out, *qleaves])
    ref = reference_partials(value.t() if columns else value, partials.shape[1], symmetric)
    assert partials.shape[0] == (70 if columns else 33)
    assert partials.shape[1] > 1  # several column tiles
    if symmetric:
        assert torch.equal(partials[..., :2].amax(1), ref[..., :2].amax(1))
    else:
        assert torch.equal(partials[..., 0].amin(1), ref[..., 0].amin(1))
        assert torch.equal(partials[..., 1:].amax(1), ref[..., 1:].amax(1))


@pytest.mark.parametrize("write_hp", [False, True], ids=["codes", "codes+hp"])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2], SPECS[4]], ids=lambda s: s.short())
def test_given_partials_replace_the_statistics_pass(spec, write_hp):
    """With partials the quantizer skips its statistics pass: the codes (and the high-precision
    value, written in the codes pass then) equal the unfused ones when the partials are right,
    and follow the partials when they are not."""
    from fqt_compiler.fusion_program import reference_partials

    x = torch.randn(15, 24, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    prog = Program((15, 24), (("mul", (("L", 0), 0.5), "float32", "none"), ("add", (("V", 0), 0.25), "float32", "none")), 1)
    sym = spec.scheme is Scheme.SYMMETRIC
    partials = reference_partials(run_reference(prog, [x]), 3, sym)
    seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    base = fused_quantize([x], prog, (15, 24), spec, Layout.PENULTIMATE, write_hp, seed=seed)
    given = fused_quantize([x], prog, (15, 24), spec, Layout.PENULTIMATE, write_hp, partials=partials, seed=seed)
    for a, b in zip(base[:5], given[:5]):
        assert torch.equal(a, b)
    assert given[4].numel() == (x.numel() if write_hp else 0)
    doubled = partials.clone()
    doubled[..., 0:2] *= 2  # sym: amax (and the nan flag 0 stays 0); asym: min and max
    wrong = fused_quantize([x], prog, (15, 24), spec, Layout.PENULTIMATE, False, partials=doubled, seed=seed)
    torch.testing.assert_close(wrong[1], 2 * base[1], rtol=1e-6, atol=0)


@pytest.mark.interpreter
def test_epilogue_statistics_op_reference_path_equals_the_kernel(monkeypatch):
    """``fqt::qmm_epilogue_stats`` off Triton (the eager path: GEMM, chain, statistics in torch)
    and under the interpreter agree once the slots are reduced."""
    from fqt_compiler.ops import qmm_epilogue_stats_op as op
    from tests.helpers.kernel_cases import PAIRS, op_args, qmm_operands

    args, _ = qmm_operands(33, 40, 70, *PAIRS["int8-sym-row"], "cpu")
    prog = Program((33, 70), (("convert", (("L", 0),), "float32", "none"),), 1)
    quant = Program((33, 70), (("mul", (("L", 0), ("L", 1)), "float32", "none"),), 2)
    other = torch.randn(33, 70, generator=torch.Generator().manual_seed(8))
    outs = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        outs.append(op(*op_args(args), torch.float32, [], prog.dumps(), quant.dumps(), False, True, [other]))
    (k_out, k_part), (r_out, r_part) = outs
    assert torch.equal(k_out, r_out) and k_part.shape == r_part.shape
    assert (torch.equal(k_part[..., 0].amin(1), r_part[..., 0].amin(1))
            and torch.equal(k_part[..., 1:].amax(1), r_part[..., 1:].amax(1)))


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[2]], ids=lambda s: s.short())
@pytest.mark.parametrize("rows", [0, 4])
def test_fused_quantize_of_an_empty_chain_matches_the_reference(spec, rows):
    """No rows (a batch of 0) or rows of no elements: the reference's shapes and zero statistics."""
    cols = 0 if rows else 6
    prog = Program((rows, cols), (("mul", (("L", 0), 2.0), "float32", "none"),), 1)
    x = torch.randn(rows, cols, device=DEVICE)
    fused = fused_quantize([x], prog, (rows, cols), spec, Layout.PENULTIMATE, True)
    ref = quantize_ref(run_reference(prog, [x]), spec, Layout.PENULTIMATE)
    for g, r in zip(fused[:4], ref):
        assert g.shape == r.shape and torch.equal(g, r)


# ------------------------------------------------------------------ leaves read where they lie
# a convolution's input chain: channels-last conv output * per-channel scale + shift, relu
_NCHW = Program(
    (2, 6, 3, 5),
    (("mul", (("L", 0), ("L", 1)), "float32", "none"), ("add", (("V", 0), ("L", 2)), "float32", "none"),
     ("relu", (("V", 1),), "float32", "none")),
    3,
)


def _nchw_leaves():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, 5, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    return [x, torch.randn(1, 6, 1, 1, generator=g).to(DEVICE), torch.randn(6, 1, 1, generator=g).to(DEVICE)]


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[3], SPECS[4]], ids=lambda s: s.short())
@pytest.mark.parametrize("layout", [Layout.DIM0, Layout.CHANNELS, Layout.PENULTIMATE, Layout.LAST], ids=lambda lay: lay.name)
def test_broadcast_and_channels_last_leaves_are_read_in_place_same_bits(spec, layout):
    """A per-channel parameter broadcast over a sample's row, or a channels-last activation
    quantized per sample, has no strided matrix view: the kernels unravel each leaf's row and
    column indices over its own dims and strides instead of copying it to a matrix first."""
    from fqt_compiler.codegen.kernels.fused import grouped_leaves

    leaves = _nchw_leaves()
    grouped = grouped_leaves(leaves, _NCHW, _NCHW.shape, spec, layout)
    assert [g.tensor.data_ptr() for g in grouped] == [t.data_ptr() for t in leaves]  # no copy
    if layout is Layout.DIM0:
        assert max(len(g.rows) + len(g.cols) for g in grouped) > 2  # these have no strided matrix view
    fused, ref = _both(_NCHW, leaves, spec, layout, _NCHW.shape)
    for name, a, b in zip(("codes", "scale", "zero point", "offset", "high precision"), fused, ref):
        assert torch.equal(a, b), name


def test_a_leaf_of_more_dims_than_the_kernel_unravels_is_copied_same_bits():
    """Six dims no two of which merge: more than the four a row or column unravels over, so
    that leaf alone is copied to a matrix; the others are still read in place."""
    from fqt_compiler.codegen.kernels.fused import grouped_leaves

    shape = (2, 3, 2, 3, 2, 3)
    prog = Program(shape, (("add", (("L", 0), ("L", 1)), "float32", "none"),), 2)
    g = torch.Generator().manual_seed(5)
    scrambled = torch.randn(3, 2, 3, 2, 3, 2, generator=g).to(DEVICE).permute(5, 4, 3, 2, 1, 0)
    leaves = [scrambled, torch.randn(shape, generator=g).to(DEVICE)]
    grouped = grouped_leaves(leaves, prog, shape, SPECS[0], Layout.DIM0)
    assert grouped[0].tensor.data_ptr() != scrambled.data_ptr() and grouped[1].tensor.data_ptr() == leaves[1].data_ptr()
    fused, ref = _both(prog, leaves, SPECS[0], Layout.DIM0, shape)
    for name, a, b in zip(("codes", "scale", "zero point", "offset", "high precision"), fused, ref):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[4]], ids=lambda s: s.short())
@pytest.mark.parametrize("layout", [Layout.DIM0, Layout.CHANNELS], ids=lambda lay: lay.name)
def test_channels_last_codes_and_value_are_written_channels_last_same_bits(spec, layout):
    """``CHANNELS_LAST``: the codes and the high-precision value of a convolution's input come
    out in the channels-last order of the activation they quantize (what the quantize op's codes
    keep, and the convolution kernels read), written in place, the same values."""
    from fqt_compiler.memory_order import CodeLayout

    seed = torch.tensor([11], dtype=torch.int64, device=DEVICE)
    base = fused_quantize(_nchw_leaves(), _NCHW, _NCHW.shape, spec, layout, True, seed=seed)
    cl = fused_quantize(_nchw_leaves(), _NCHW, _NCHW.shape, spec, layout, True, code_layout=CodeLayout.CHANNELS_LAST,
                        seed=seed)
    for i in (0, 4):
        assert cl[i].is_contiguous(memory_format=torch.channels_last) and not cl[i].is_contiguous()
        assert torch.equal(cl[i], base[i])
    for i in (1, 2, 3):
        assert torch.equal(cl[i], base[i])
