"""Low-bit GEMM: the Triton kernel and the CPU torch._int_mm path equal reference.qmm_ref bit
for bit, and all three match the dequantize-then-GEMM result to fp32 round-off."""

from __future__ import annotations

import pytest
import torch

from fqt_compiler.codegen.kernels.qmm import qmm
from fqt_compiler.ops import qmm_cpu, qmm_op
from fqt_compiler.grid import QOperand
from fqt_compiler.layout import Layout
from fqt_compiler.reference import qmm_ref, quantize_ref
from fqt_compiler.specs import QuantSpec
from tests.helpers.device import DEVICE
from tests.helpers.kernel_cases import PAIRS, op_args, qmm_operands, to_cpu
from tests.helpers.sm90 import compile_without_interpreter

@pytest.mark.parametrize("pair", PAIRS, ids=str)
@pytest.mark.parametrize("mkn", [(5, 7, 3), (33, 70, 40), (1, 1, 1), (64, 16, 1)], ids=str)
def test_qmm_kernel_matches_reference_bitwise(pair, mkn):
    args, _ = qmm_operands(*mkn, *PAIRS[pair], DEVICE)
    ref = qmm_ref(*to_cpu(args))
    assert torch.equal(qmm(*args).cpu(), ref)


@pytest.mark.parametrize("split", [2, 3, 8])
@pytest.mark.parametrize("mkn", [(5, 300, 3), (33, 512, 40), (40, 129, 24)], ids=str)
def test_split_k_matches_reference_bitwise(split, mkn):
    """Split-K (weight gradients: few output tiles, long K) sums its slices' int32 accumulators
    exactly, then dequantizes like the unsplit kernel: the same bits, with K a multiple of the
    K tile (no load masks) or not, and with slices that do not divide K."""
    args, _ = qmm_operands(*mkn, *PAIRS["int8-sym-row"], DEVICE)
    ref = qmm_ref(*to_cpu(args))
    assert torch.equal(qmm(*args, split=split).cpu(), ref)
    # bf16 out: the same bits as the unsplit kernel (the interpreter's fp32 -> bf16 store rounds its own way)
    assert torch.equal(qmm(*args, torch.bfloat16, split=split), qmm(*args, torch.bfloat16, split=1))


def test_split_k_fp8_sums_slices_in_order_and_refuses_zero_points():
    spec = QuantSpec(format="fp8_e4m3", granularity="row")
    g = torch.Generator().manual_seed(3)
    qa = quantize_ref(torch.randn(24, 384, generator=g).to(DEVICE), spec, Layout.PENULTIMATE)
    qb = quantize_ref(torch.randn(16, 384, generator=g).to(DEVICE).t(), spec, Layout.LAST)
    a, b = QOperand(qa[0], qa[1]), QOperand(qb[0], qb[1])
    got, whole = qmm(a, b, split=3), qmm(a, b)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)  # fp32 partial sums in another order
    args, _ = qmm_operands(8, 256, 8, *PAIRS["paper-asym-zog-tensor"], DEVICE)
    with pytest.raises(ValueError, match="split-K needs GEMMs without zero points"):
        qmm(*args, split=2)


def test_split_k_is_chosen_for_few_tiles_and_long_k(monkeypatch):
    """On an H200 (132 SMs): a 768 x 768 weight gradient over 16384 tokens is split; a
    4096 x 4096 output, a short K, a zero-point GEMM or the CPU are not."""
    from fqt_compiler.codegen.kernels.qmm import split_k

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    cuda = torch.device("cuda")
    assert split_k(768, 768, 16384, cuda, affine=False) == 3  # 36 tiles: 132 // 36
    assert split_k(256, 256, 16384, cuda, affine=False) == 16  # 4 tiles, capped
    assert split_k(4096, 4096, 16384, cuda, affine=False) == 1
    assert split_k(768, 768, 2048, cuda, affine=False) == 1
    assert split_k(768, 768, 16384, cuda, affine=True) == 1
    assert split_k(768, 768, 16384, torch.device("cpu"), affine=False) == 1


@pytest.mark.parametrize("pair", PAIRS, ids=str)
@pytest.mark.parametrize("mkn", [(5, 7, 3), (128, 96, 80)], ids=str)
def test_qmm_cpu_int_mm_path_matches_reference_bitwise(pair, mkn):
    args, _ = qmm_operands(*mkn, *PAIRS[pair], "cpu")
    assert torch.equal(qmm_cpu(*args, torch.float32), qmm_ref(*args))
    assert torch.equal(qmm_op(*op_args(args), torch.float32), qmm_ref(*args))


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_qmm_matches_dequantize_then_matmul(pair):
    args, (qa, qb) = qmm_operands(48, 64, 24, *PAIRS[pair], "cpu")
    dq_a = (qa[0].float() - qa[2]) * qa[1] + qa[3]
    dq_b = (qb[0].float() - qb[2]) * qb[1] + qb[3]
    expected = dq_a.double() @ dq_b.double() + args[-1].double()
    got = qmm_ref(*args).double()
    # the affine epilogue subtracts large offset terms: allow fp32 round-off of their size
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


def test_qmm_out_dtype_and_errors():
    args, _ = qmm_operands(8, 8, 8, *PAIRS["int8-sym-row"], "cpu")
    assert qmm_ref(*args, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="2-D GEMM"):
        qmm(QOperand(args[0].codes, args[0].scale), QOperand(args[1].codes[:3], args[1].scale))  # K = 8 against 3
    with pytest.raises(TypeError, match="int8 or fp8"):
        qmm(QOperand(args[0].codes.float(), args[0].scale), QOperand(args[1].codes.float(), args[1].scale))


def test_fp8_qmm_kernel_close_to_reference():
    # fp8 accumulates in fp32: same numbers up to summation order
    spec = QuantSpec(format="fp8_e4m3", granularity="row")
    x = torch.randn(40, 72, device=DEVICE)
    w = torch.randn(24, 72, device=DEVICE)
    qa = quantize_ref(x, spec, Layout.PENULTIMATE)
    qb = quantize_ref(w.t(), spec, Layout.LAST)
    got = qmm(QOperand(qa[0], qa[1]), QOperand(qb[0], qb[1]))
    ref = qmm_ref(QOperand(qa[0], qa[1]), QOperand(qb[0], qb[1]))
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("formats", [("fp8_e5m2", "fp8_e4m3"), ("fp8_e4m3", "fp8_e5m2"), ("fp8_e5m2", "fp8_e5m2")], ids=str)
def test_mixed_fp8_qmm_kernel_close_to_reference(formats):
    """The fp8 recipe's backward GEMMs: e5m2 gradient codes times e4m3 codes in one kernel."""
    a_spec, b_spec = (QuantSpec(format=f, granularity="row") for f in formats)
    g = torch.Generator().manual_seed(3)
    qa = quantize_ref(torch.randn(40, 72, generator=g).to(DEVICE), a_spec, Layout.PENULTIMATE)
    qb = quantize_ref(torch.randn(24, 72, generator=g).to(DEVICE).t(), b_spec, Layout.LAST)
    assert qa[0].dtype != qb[0].dtype or formats[0] == formats[1]
    got = qmm(QOperand(qa[0], qa[1]), QOperand(qb[0], qb[1]))
    ref = qmm_ref(QOperand(qa[0], qa[1]), QOperand(qb[0], qb[1]))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fp8_qmm_long_k_error_against_float64():
    """A weight-gradient-like GEMM with a long contraction (K = 8192), against float64. Under
    the interpreter fp8 products are summed in fp32. On sm_90 the tensor cores sum each K tile
    in an fp8 accumulator of about 14 bits, and the kernel adds each tile's sum to an fp32
    accumulator (``FP8_PROMOTE_K``): the error stays at that accumulator's level instead of
    growing with K, as it does without promotion (percent-level at this K)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(32, 8192, generator=g).to(DEVICE).to(torch.float8_e5m2)
    b = torch.randn(32, 8192, generator=g).to(DEVICE).to(torch.float8_e4m3fn).t()
    ones_a, ones_b = torch.ones(32, 1, device=DEVICE), torch.ones(1, 32, device=DEVICE)
    got = qmm(QOperand(a, ones_a), QOperand(b, ones_b)).double()
    ref = a.double() @ b.double()
    assert ((got - ref).norm() / ref.norm()).item() < (1e-5 if DEVICE == "cpu" else 2e-4)


def test_qmm_rejects_int8_by_fp8():
    a = torch.zeros(4, 8, dtype=torch.int8)
    b = torch.zeros(8, 4, dtype=torch.float8_e4m3fn)
    one = torch.ones(1)
    with pytest.raises(TypeError, match="int8 or fp8"):
        qmm(QOperand(a, one), QOperand(b, one))


_PROMOTION = """
from fqt_compiler.tools.ptx import operand_loads, qmm_ptx
import re
print(*(operand_loads(True, True, a, b)["add.f32"] for a, b in (("int8", None), ("e4m3", None), ("e5m2", "e4m3"))))
print(*sorted(set(re.findall(r"wgmma\\.mma_async\\S*", qmm_ptx(True, True, "e5m2", "e4m3")))))
"""


def test_sm90_fp8_qmm_promotes_its_accumulator_and_takes_mixed_formats():
    """Compiled for sm_90: the mixed e5m2 x e4m3 GEMM is one wgmma instruction family, and every
    fp8 K tile ends with one fp32 add per accumulator element (128 x 128 tile / 256 threads =
    64 per thread) -- Triton's sm_90 default never promotes; int8 accumulates exactly, none."""
    lines = compile_without_interpreter(_PROMOTION).strip().splitlines()
    int8_adds, e4m3_adds, mixed_adds = map(int, lines[0].split())
    assert int8_adds == 0 and e4m3_adds == mixed_adds == 64, lines
    assert lines[1].split() == ["wgmma.mma_async.sync.aligned.m64n128k32.f32.e5m2.e4m3"], lines


@pytest.mark.slow  # about 40 s: 16 kernels compiled for sm_90 and assembled by ptxas
def test_sm90_autotune_tiles_do_not_spill():
    """Every sm_90 tile in the autotune lists assembles without register spills for the plain
    GEMM (int8 and fp8 codes) and the quantize rows kernel (one pass over rows of up to 16384
    elements, or chunks); a heavy generated epilogue (GELU in bf16 and the next quantizer's
    statistics) spills at most a couple of hundred bytes, where the 128-row tiles it no longer
    lists spilled 2-20 KB."""
    import json

    out = compile_without_interpreter(
        "import json; from fqt_compiler.tools.ptx import spill_table; print(json.dumps(spill_table()))"
    )
    rows = json.loads(out.strip().splitlines()[-1])
    assert len(rows) == 21
    for r in rows:
        assert r["registers"] > 0, r
        assert r["spill_bytes"] <= (256 if r["family"] == "epilogue" else 0), r
