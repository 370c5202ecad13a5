"""Exact int8 GEMMs on the CPU: ``torch._int_mm`` where this CPU multiplies int8 fast, else the
same integer sums on its fp32 units.

``torch._int_mm`` on an x86 CPU without int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI,
AMX) takes a slow reference path: 25-33x slower than an fp32 GEMM of the same size on a 2-core
AVX2 EPYC (512^3 to 2048^3), which made every int8 GEMM of a training step the slowest op of
that step. An fp32 GEMM of int8 codes is exact while every partial sum stays below 2**24:
a product is at most 128 x 128 = 2**14 in magnitude, so a sum of up to 1024 of them is an
integer below 2**24 in any order of summation. Longer reductions are cut into chunks of 1024
whose exact sums are added in int32: the int32 sums ``torch._int_mm`` returns, bit for bit.

Which one runs is measured once per process (:func:`int8_gemm_provider`), outside every tracing
mode: both are exact, so the choice changes speed only. ``FQT_CPU_INT8_GEMM`` (``int_mm`` or
``fp32``) overrides the measurement.
"""

from __future__ import annotations

import functools
import os
import time

import torch

from .errors import OptionsError

__all__ = ["int8_mm", "int8_bmm", "int8_bmm_runs_int_mm", "exact_bmm", "int8_gemm_provider", "int8_gemm_name", "INT_MM",
           "FP32_UNITS"]

INT_MM = "torch._int_mm"
FP32_UNITS = "fp32 units"

_EXACT_CHUNK = 1024  # 1024 products of at most 2**14: every partial sum an exact fp32 integer
_BATCHED_LIMIT = 1 << 24  # chunk results held at once (elements) before summing chunk by chunk
_ENV = "FQT_CPU_INT8_GEMM"
# the least M and N of a batch entry that torch._int_mm runs one by one: below it, a library
# call per entry costs more than the batch's fp32 GEMM (a depthwise convolution's weight
# gradient is hundreds of 1 x 1 products per kernel offset)
_INT_MM_LOOP_MIN = 16


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of (M, K) and (K, N) int8 tensors as exact int32 sums: on a CPU, on the provider
    measured fastest here; elsewhere ``torch._int_mm``. ``torch._int_mm``'s operand rules apply
    to its path (callers keep every dim > 1 and operands row- or column-major)."""
    if a.device.type != "cpu" or int8_gemm_provider() == INT_MM:
        return torch._int_mm(a, b)
    return _on_fp32_units(a, b)


def _on_fp32_units(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    k = a.shape[1]
    if k <= _EXACT_CHUNK:
        return (a.float() @ b.float()).to(torch.int32)
    chunks = -(-k // _EXACT_CHUNK)
    if chunks * a.shape[0] * b.shape[1] <= _BATCHED_LIMIT:
        # one batched GEMM over the chunks (zero codes pad the last one: exact), summed in int32
        pad = chunks * _EXACT_CHUNK - k
        af = torch.nn.functional.pad(a.float(), (0, pad)).view(a.shape[0], chunks, _EXACT_CHUNK).transpose(0, 1)
        bf = torch.nn.functional.pad(b.float(), (0, 0, 0, pad)).view(chunks, _EXACT_CHUNK, b.shape[1])
        return torch.bmm(af, bf).to(torch.int32).sum(0, dtype=torch.int32)
    return exact_bmm(a.unsqueeze(0), b.unsqueeze(0))[0]


def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of (B, M, K) and (B, K, N) int8 tensors as exact int32 sums, batched: the
    per-group GEMMs of a grouped convolution in one call. ``torch._int_mm`` (one call per batch
    entry) where this CPU multiplies int8 fast and every entry is a real GEMM (M and N at least
    16); else :func:`exact_bmm` on the codes as fp32. Any strides."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"int8_bmm: expected (B, M, K) @ (B, K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    batch, m, _ = a.shape
    n = b.shape[2]
    if int8_bmm_runs_int_mm(a.device, m, n):
        out = torch.empty((batch, m, n), dtype=torch.int32, device=a.device)
        for i in range(batch):
            torch._int_mm(_row_or_column_major(a[i]), _row_or_column_major(b[i]), out=out[i])
        return out
    return exact_bmm(a, b)


def int8_bmm_runs_int_mm(device: torch.device, m: int, n: int) -> bool:
    """Whether :func:`int8_bmm` of (M, K) @ (K, N) entries runs ``torch._int_mm`` per entry."""
    return (device.type != "cpu" or int8_gemm_provider() == INT_MM) and min(m, n) >= _INT_MM_LOOP_MIN


def exact_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of (B, M, K) and (B, K, N) int8 codes, or fp32 tensors holding them (callers
    that convert their codes once and multiply many views of them), as exact int32 sums: one
    batched fp32 GEMM per 1024 of K (every partial sum an exact fp32 integer; int8 operands
    converted a chunk at a time), added in int32."""
    if a.shape[2] == 0:  # an empty contraction: every sum is 0
        return torch.zeros((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.int32, device=a.device)
    out = None
    for k0 in range(0, a.shape[2], _EXACT_CHUNK):
        part = torch.bmm(a[:, :, k0:k0 + _EXACT_CHUNK].float(), b[:, k0:k0 + _EXACT_CHUNK].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def _row_or_column_major(t: torch.Tensor) -> torch.Tensor:
    """A 2-D operand as ``torch._int_mm`` reads it: row- or column-major (a view it misreads is copied)."""
    rows, cols = t.shape
    if t.stride() == (cols, 1) or t.stride() == (1, rows):
        return t
    return t.contiguous()


@functools.cache
def int8_gemm_provider() -> str:
    """The CPU int8 GEMM this process uses: :data:`INT_MM` or :data:`FP32_UNITS`. Timed once,
    at a (128 x 1024) @ (1024 x 128) product (milliseconds), on real tensors outside every tracing mode (it is
    first asked while a graph is traced); ``FQT_CPU_INT8_GEMM`` = ``int_mm`` or ``fp32``
    overrides."""
    forced = os.environ.get(_ENV)
    if forced:
        choices = {"int_mm": INT_MM, "fp32": FP32_UNITS}
        if forced not in choices:
            raise OptionsError(f"{_ENV}={forced!r} is not valid; use one of {sorted(choices)} or leave it unset")
        return choices[forced]
    with torch.utils._python_dispatch._disable_current_modes(), torch.no_grad():
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (128, 1024), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (128, 1024), generator=g, dtype=torch.int8).t()  # K-major, as fqt writes codes
        t_int_mm, t_fp32 = _best_of(lambda: torch._int_mm(a, b)), _best_of(lambda: _on_fp32_units(a, b))
    return INT_MM if t_int_mm <= t_fp32 else FP32_UNITS


def int8_gemm_name() -> str:
    """How the decision table names this process's CPU int8 GEMM."""
    return INT_MM if int8_gemm_provider() == INT_MM else "int8 GEMM on fp32 units (exact int32 sums)"


def _best_of(fn, reps: int = 3) -> float:
    fn()  # first call: library start-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
