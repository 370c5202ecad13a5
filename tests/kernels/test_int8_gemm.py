"""The CPU int8 GEMM: ``torch._int_mm`` or the same int32 sums on fp32 units, whichever this CPU
runs faster; both bit-identical to the integer product."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fqt_compiler import int8_gemm
from fqt_compiler.errors import OptionsError
from tests.helpers.int8_provider import PROVIDERS, forced_provider


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 40), k=st.integers(2, 3000), n=st.integers(2, 40), k_major=st.booleans(), seed=st.integers(0, 99))
def test_fp32_units_give_the_exact_int32_sums(m, k, n, k_major, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).t() if k_major else \
        torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    assert torch.equal(int8_gemm._on_fp32_units(a, b), _exact(a, b))


@pytest.mark.parametrize("k", [1024, 1025, 4096])
@pytest.mark.parametrize("batched", [True, False])
def test_worst_codes_stay_exact_in_both_chunkings(k, batched, monkeypatch):
    """-128 x -128 everywhere: a chunk of 1024 sums to exactly 2**24, the largest exact fp32
    integer run of this length; longer reductions add chunks in int32, batched or one by one."""
    if not batched:
        monkeypatch.setattr(int8_gemm, "_BATCHED_LIMIT", 0)
    a = torch.full((3, k), -128, dtype=torch.int8)
    b = torch.full((k, 5), -128, dtype=torch.int8)
    got = int8_gemm._on_fp32_units(a, b)
    assert got.dtype == torch.int32 and torch.equal(got, _exact(a, b))
    assert int(got[0, 0]) == k * 128 * 128


def test_int8_mm_runs_the_provider_measured_orforced_provider(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (48, 64), generator=g, dtype=torch.int8).t()
    for env, provider in (("int_mm", int8_gemm.INT_MM), ("fp32", int8_gemm.FP32_UNITS)):
        monkeypatch.setenv("FQT_CPU_INT8_GEMM", env)
        int8_gemm.int8_gemm_provider.cache_clear()
        try:
            assert int8_gemm.int8_gemm_provider() == provider
            assert torch.equal(int8_gemm.int8_mm(a, b), torch._int_mm(a, b))
        finally:
            int8_gemm.int8_gemm_provider.cache_clear()
    monkeypatch.setenv("FQT_CPU_INT8_GEMM", "vnni")
    with pytest.raises(OptionsError, match="FQT_CPU_INT8_GEMM"):
        int8_gemm.int8_gemm_provider()
    int8_gemm.int8_gemm_provider.cache_clear()
    monkeypatch.delenv("FQT_CPU_INT8_GEMM")
    assert int8_gemm.int8_gemm_provider() in (int8_gemm.INT_MM, int8_gemm.FP32_UNITS)  # measured


def test_the_measurement_runs_outside_a_fake_tensor_trace():
    """First asked while a graph is traced on fake tensors: the timing still runs real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    int8_gemm.int8_gemm_provider.cache_clear()
    with FakeTensorMode():
        a = torch.empty(16, 32, dtype=torch.int8)
        b = torch.empty(32, 8, dtype=torch.int8)
        out = int8_gemm.int8_mm(a, b)
    assert out.shape == (16, 8) and out.dtype == torch.int32
    assert int8_gemm.int8_gemm_provider() in (int8_gemm.INT_MM, int8_gemm.FP32_UNITS)


@pytest.fixture(params=PROVIDERS)
def provider(request):
    """Each CPU int8 GEMM provider in turn."""
    with forced_provider(request.param):
        yield request.param


@pytest.mark.parametrize("forced", ["int_mm", "fp32"])
@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 40), m=st.integers(1, 24), k=st.integers(1, 2600), n=st.integers(1, 24),
       strided=st.booleans(), seed=st.integers(0, 99))
def test_int8_bmm_gives_the_exact_int32_sums(forced, batch, m, k, n, strided, seed):
    """Grouped convolutions' weight gradients: depthwise (1 x 1 per group) to real GEMMs, long
    reductions in chunks, operands as the convolution's permuted views hand them over."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (batch, m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (batch, k, n), generator=g, dtype=torch.int8)
    if strided:  # the layouts of conv_cpu's (rows, groups, channels) views
        a = a.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        b = b.transpose(0, 1).contiguous().transpose(0, 1)
    with forced_provider(forced):
        got = int8_gemm.int8_bmm(a, b)
    assert got.dtype == torch.int32 and torch.equal(got, (a.long() @ b.long()).to(torch.int32))


@pytest.mark.parametrize("k", [1024, 1025, 2049])
def test_int8_bmm_worst_codes_across_chunk_boundaries(provider, k):
    a = torch.full((3, 2, k), -128, dtype=torch.int8)
    b = torch.full((3, k, 1), -128, dtype=torch.int8)
    got = int8_gemm.int8_bmm(a, b)
    assert torch.equal(got, torch.full((3, 2, 1), k * 128 * 128, dtype=torch.int32))


def test_int8_bmm_names_mismatched_operands():
    with pytest.raises(ValueError, match=r"\(B, M, K\) @ \(B, K, N\)"):
        int8_gemm.int8_bmm(torch.zeros(2, 3, 4, dtype=torch.int8), torch.zeros(3, 4, 5, dtype=torch.int8))
