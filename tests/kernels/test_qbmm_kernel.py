"""Batched low-bit GEMM (attention's ``bmm``): the Triton kernel and the CPU path equal
reference.qbmm_ref bit for bit, per-entry and shared statistics alike, and all of them match the
dequantize-then-bmm result to fp32 round-off."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fqt_compiler.codegen.kernels import qbmm as qbmm_module
from fqt_compiler.codegen.kernels.qbmm import qbmm
from fqt_compiler.grid import QOperand, dequantize_ref
from fqt_compiler.layout import Layout
from fqt_compiler.ops import qbmm_cpu, qbmm_op
from fqt_compiler.reference import qbmm_ref, quantize_ref
from fqt_compiler.specs import QuantSpec
from tests.helpers.device import DEVICE
from tests.helpers.int8_provider import PROVIDERS, forced_provider
from tests.helpers.kernel_cases import PAIRS
from tests.helpers.sm90 import compile_without_interpreter

def qbmm_operands(batch, m, k, n, a_spec, b_spec, device, shared=False, seed=0, a_k_major=True):
    """Quantized (B, M, K) and (B, K, N) operands, A per (entry, row). B per (entry, column)
    (its layout LAST puts its natural rows along the last dim), or with ``shared`` per column
    for the whole batch (B's own columns, the batch folded into its rows: statistics (1, 1, N),
    read with a batch stride of 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, m, k, generator=g) * 2 + 0.5
    y = torch.randn(batch, k, n, generator=g)
    if not a_k_major:  # A's codes column-major within each entry (a transposed operand)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    qa = quantize_ref(x.to(device), a_spec, Layout.PENULTIMATE)
    if shared:
        column = b_spec.with_(granularity="column") if b_spec.granularity.value == "row" else b_spec
        qb = quantize_ref(y.to(device), column, Layout.PENULTIMATE)
    else:
        qb = quantize_ref(y.to(device), b_spec, Layout.LAST)
    affine = a_spec.scheme.value != "sym" or b_spec.scheme.value != "sym"
    a_op = QOperand(qa[0], qa[1], qa[2] if affine else None, qa[3] if affine else None)
    b_op = QOperand(qb[0], qb[1], qb[2] if affine else None, qb[3] if affine else None)
    return a_op, b_op


def _cpu(op: QOperand) -> QOperand:
    return QOperand(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in op))


@pytest.mark.parametrize("pair", PAIRS, ids=str)
@pytest.mark.parametrize("bmkn", [(3, 5, 7, 3), (2, 33, 70, 40), (1, 1, 1, 1), (4, 64, 16, 1)], ids=str)
def test_qbmm_kernel_matches_reference_bitwise(pair, bmkn):
    a, b = qbmm_operands(*bmkn, *PAIRS[pair], DEVICE)
    ref = qbmm_ref(_cpu(a), _cpu(b))
    assert torch.equal(qbmm(a, b).cpu(), ref)


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_qbmm_kernel_shared_statistics_and_column_major_codes(pair):
    """B's statistics shared by the batch (batch stride 0) and A's codes column-major in each entry."""
    a, b = qbmm_operands(3, 20, 36, 12, *PAIRS[pair], DEVICE, shared=True, a_k_major=False)
    assert torch.equal(qbmm(a, b).cpu(), qbmm_ref(_cpu(a), _cpu(b)))


def test_qbmm_kernel_launches_a_large_batch_in_slices(monkeypatch):
    """CUDA's grid limits the batch axis: a batch larger than the limit runs in slices, each
    reading its own entries' statistics."""
    monkeypatch.setattr(qbmm_module, "MAX_GRID_BATCH", 2)
    a, b = qbmm_operands(5, 9, 16, 7, *PAIRS["int4-asym-row"], DEVICE)
    assert torch.equal(qbmm(a, b).cpu(), qbmm_ref(_cpu(a), _cpu(b)))


@pytest.mark.parametrize("forced", PROVIDERS)
@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 6), m=st.integers(1, 40), k=st.integers(1, 1500), n=st.integers(1, 40),
       pair=st.sampled_from(sorted(PAIRS)), shared=st.booleans(), seed=st.integers(0, 99))
def test_qbmm_cpu_matches_reference_bitwise(forced, batch, m, k, n, pair, shared, seed):
    """The CPU path (exact int32 sums and the shared epilogue) equals the reference bit for bit
    with either int8 provider, and as traced for Inductor, K past the fp32 units' exact chunk
    included."""
    a, b = qbmm_operands(batch, m, k, n, *PAIRS[pair], "cpu", shared=shared, seed=seed)
    with forced_provider(forced):
        ref = qbmm_ref(a, b)
        assert torch.equal(qbmm_cpu(a, b, torch.float32), ref)
        assert torch.equal(qbmm_op(*a, *b, torch.float32), ref)
        assert torch.equal(qbmm_cpu(a, b, torch.float32, traced=True), ref)


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_qbmm_matches_dequantize_then_bmm(pair):
    a, b = qbmm_operands(4, 24, 48, 16, *PAIRS[pair], DEVICE)
    a_hat, b_hat = (dequantize_ref(o.codes, o.scale, 0 if o.zero_point is None else o.zero_point,
                                   0 if o.offset is None else o.offset, torch.float32) for o in (a, b))
    want = torch.bmm(a_hat.double(), b_hat.double()).float().cpu()
    for got in (qbmm(a, b).cpu(), qbmm_op(*_cpu(a), *_cpu(b), torch.float32)):
        # the affine epilogue subtracts large offset terms: allow fp32 round-off of their size
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())


def test_qbmm_out_dtype_and_fp8_close_to_reference():
    a, b = qbmm_operands(2, 16, 32, 8, *PAIRS["int8-sym-row"], DEVICE)
    assert qbmm(a, b, torch.bfloat16).dtype == torch.bfloat16
    assert qbmm_op(*_cpu(a), *_cpu(b), torch.bfloat16).dtype == torch.bfloat16
    spec = QuantSpec(format="fp8_e4m3", granularity="row")
    fa, fb = qbmm_operands(3, 16, 40, 8, spec, spec, DEVICE)
    torch.testing.assert_close(qbmm(fa, fb).cpu(), qbmm_ref(_cpu(fa), _cpu(fb)), rtol=1e-5, atol=1e-5)


def test_qbmm_of_an_empty_contraction_is_zero():
    """K = 0 (an empty sequence on the contracted side): every sum is 0, as torch.bmm gives."""
    a = QOperand(torch.zeros(2, 5, 0, dtype=torch.int8), torch.ones(2, 5, 1))
    b = QOperand(torch.zeros(2, 0, 3, dtype=torch.int8), torch.ones(1, 1, 3))
    on_device = [QOperand(op.codes.to(DEVICE), op.scale.to(DEVICE)) for op in (a, b)]
    for got in (qbmm_cpu(a, b, torch.float32), qbmm_cpu(a, b, torch.float32, traced=True), qbmm_ref(a, b),
                qbmm(*on_device).cpu()):
        assert torch.equal(got, torch.zeros(2, 5, 3))


def test_qbmm_errors_name_the_problem():
    a, b = qbmm_operands(2, 4, 8, 3, *PAIRS["int8-sym-row"], "cpu")
    with pytest.raises(ValueError, match="do not form a batched"):
        qbmm_op(a.codes, a.scale, None, None, b.codes[:1], b.scale[:1], None, None, torch.float32)
    varying_k = torch.rand(2, 1, 8)  # A's scale per (entry, k): varies along the contraction
    with pytest.raises(ValueError, match="A's statistics have shape \\(2, 1, 8\\)"):
        qbmm_op(a.codes, varying_k, None, None, b.codes, b.scale, None, None, torch.float32)
    with pytest.raises(ValueError, match="B's statistics"):
        qbmm_op(a.codes, a.scale, None, None, b.codes, torch.rand(2, 8, 1), None, None, torch.float32)
    with pytest.raises(TypeError, match="int8 or fp8"):
        qbmm(QOperand(a.codes.float(), a.scale), b)


_SM90 = """
import json, re
from fqt_compiler.tools.ptx import ptxas_usage, qbmm_ptx
rows = []
CASES = (("int8", False, (128, 128, 128, 4, 8), True), ("int8", True, (64, 128, 128, 4, 4), True),
         ("e4m3", False, (256, 128, 128, 3, 8), True), ("int8", False, (128, 256, 128, 3, 8), False))
for dtype, affine, tile, b_k_major in CASES:
    ptx = qbmm_ptx(dtype, affine, tile, b_k_major)
    rows.append([dtype, affine, len(re.findall(r"wgmma\\.mma_async", ptx)), ptxas_usage(ptx)["spill_bytes"]])
print(json.dumps(rows))
"""


@pytest.mark.slow  # about 20 s: four kernels compiled for sm_90 and assembled by ptxas
def test_sm90_qbmm_compiles_to_tensor_core_gemms_without_spills():
    """Compiled for sm_90 (Hopper): the batched kernel's K loop is wgmma instructions (int8,
    with and without zero points, and fp8; B K-major, and N-major as attention's ``P V`` reads
    V), and it assembles without register spills."""
    import json

    rows = json.loads(compile_without_interpreter(_SM90).strip().splitlines()[-1])
    for dtype, affine, wgmma, spills in rows:
        assert wgmma > 0 and spills == 0, (dtype, affine, wgmma, spills)
