"""GEMM providers chosen by measurement: fqt's Triton GEMM, or a library 8-bit GEMM where it is faster.

Beside the Triton GEMM (the one that carries fused epilogues), a plain low-bit GEMM of a graph
Inductor compiles for CUDA can run on

* ``torch._int_mm`` (cuBLASLt int8): int8 codes, K-major operands; the dequantization
  (scales, zero-point corrections, offsets, bias) follows as aten ops that Inductor fuses into
  one pass over the int32 output -- the same numbers as ``reference.qmm_ref``, bit for bit;
* ``torch._scaled_mm`` (cuBLASLt fp8): e4m3 x e4m3 or e5m2 x e4m3 codes with per-tensor or
  per-row / per-column scales applied in the library's epilogue, bf16 out, K-major operands.

Which one runs is decided per GEMM shape and dtypes by timing the candidates on the device
(CUDA events, median of several runs; the library GEMMs with the cost of the pass their
epilogue needs), the bf16 GEMM of the same shape timed beside them. The result is cached on
disk per device name (``measured.profile_dir()``), so a shape is measured once per machine, not
once per process. The decision table names the provider and the measured ratios; on a GPU,
``never_slower`` compares a site's GEMMs by these measurements too (``gemm_seconds``). GEMMs
with a generated epilogue keep the Triton GEMM: the fusion is what fqt decides from the graph.
"""

from __future__ import annotations

import enum
import json
import os
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from fqt_compiler.cost import set_gemm_timer
from fqt_compiler.measured import profile_path
from fqt_compiler.ops import qmm_op
from fqt_compiler.codegen.inline import all_static, inline_graph_node, qmm_cpu_of_op_args

__all__ = [
    "Provider", "GemmCase", "ProviderCache", "ProviderChoice", "candidates", "measure_case", "choose_providers",
    "scaled_mm_of_op_args", "MEASURE", "gemm_seconds",
]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class Provider(str, enum.Enum):
    """Who runs a low-bit GEMM."""

    TRITON = "triton qmm"
    INT_MM = "torch._int_mm"
    SCALED_MM = "torch._scaled_mm"


@dataclass(frozen=True)
class GemmCase:
    """What a provider's speed depends on: sizes, code dtypes, output dtype, statistics."""

    m: int
    k: int
    n: int
    a_dtype: torch.dtype
    b_dtype: torch.dtype
    out_dtype: torch.dtype
    affine: bool
    bias: bool
    k_major: bool  # A row-major and B column-major (K contiguous in both): what the libraries take

    def key(self) -> str:
        names = [str(d).removeprefix("torch.") for d in (self.a_dtype, self.b_dtype, self.out_dtype)]
        return f"{self.m}x{self.k}x{self.n}:{names[0]}x{names[1]}->{names[2]}:affine={self.affine}:bias={self.bias}"

    @classmethod
    def of_node(cls, node: fx.Node) -> GemmCase:
        a, za, oa, b, zb, ob, bias = (node.args[i] for i in (0, 2, 3, 4, 6, 7, 8))
        av, bv = a.meta["val"], b.meta["val"]
        (m, k), n = av.shape, bv.shape[1]
        k_major = av.stride(1) == 1 and bv.stride(0) == 1
        return cls(m, k, n, av.dtype, bv.dtype, node.args[9], any(t is not None for t in (za, oa, zb, ob)), bias is not None,
                   k_major)


def candidates(case: GemmCase) -> list[Provider]:
    """The providers that can run ``case`` (the Triton GEMM always can). cuBLASLt's 8-bit GEMMs
    take K-major operands only; ``torch._int_mm`` needs M > 16 and K, N multiples of 8;
    ``torch._scaled_mm`` K, N multiples of 16, no zero points, a bf16 output and not two e5m2
    operands."""
    out = [Provider.TRITON]
    if not case.k_major:
        return out
    if case.a_dtype == case.b_dtype == torch.int8 and case.m > 16 and case.k % 8 == 0 and case.n % 8 == 0:
        out.append(Provider.INT_MM)
    fp8 = case.a_dtype in (E4M3, E5M2) and case.b_dtype in (E4M3, E5M2)
    if (fp8 and not case.a_dtype == case.b_dtype == E5M2 and not case.affine and case.out_dtype == torch.bfloat16
            and case.k % 16 == 0 and case.n % 16 == 0):
        out.append(Provider.SCALED_MM)
    return out


def scaled_mm_of_op_args(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype):
    """``fqt::qmm`` (no zero points, fp8) on ``torch._scaled_mm``: scales per tensor or per
    row of A / column of B in cuBLASLt's epilogue, the bias added after (Inductor fuses it)."""
    m, n = a.shape[0], b.shape[1]
    scale_a = sa.to(torch.float32).reshape(()) if sa.numel() == 1 else sa.to(torch.float32).reshape(m, 1)
    scale_b = sb.to(torch.float32).reshape(()) if sb.numel() == 1 else sb.to(torch.float32).reshape(1, n)
    if scale_a.dim() != scale_b.dim():  # cuBLASLt takes both per tensor or both row-wise
        scale_a, scale_b = scale_a.expand(m, 1).contiguous(), scale_b.expand(1, n).contiguous()
    out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return out + bias.to(out_dtype) if bias is not None else out


# torch._int_mm plus the reference epilogue as aten ops: the CPU lowering's function, which runs on CUDA too
_RUNS: dict[Provider, Callable] = {Provider.INT_MM: qmm_cpu_of_op_args, Provider.SCALED_MM: scaled_mm_of_op_args}


# ------------------------------------------------------------------ measurement
def _operands(case: GemmCase, device: torch.device) -> tuple:
    """Random operands of ``case`` on ``device``, as fqt's lowered GEMM receives them."""
    g = torch.Generator(device=device).manual_seed(0)

    def codes(rows: int, dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.int8:
            return torch.randint(-127, 128, (rows, case.k), generator=g, device=device, dtype=torch.int8)
        return torch.randn(rows, case.k, generator=g, device=device).to(dtype)

    a, b = codes(case.m, case.a_dtype), codes(case.n, case.b_dtype).t()  # B column-major: K-major
    sa = torch.rand(case.m, 1, generator=g, device=device) + 0.5
    sb = torch.rand(1, case.n, generator=g, device=device) + 0.5
    za = oa = zb = ob = None
    if case.affine:
        za, oa = torch.zeros_like(sa), torch.zeros_like(sa)
        zb, ob = torch.zeros_like(sb), torch.zeros_like(sb)
    bias = torch.randn(case.n, generator=g, device=device).to(case.out_dtype) if case.bias else None
    return a, sa, za, oa, b, sb, zb, ob, bias, case.out_dtype


def _median_seconds(fns: dict[str, Callable], reps: int) -> dict[str, float]:
    """Median seconds of each function on the current CUDA stream (CUDA events), interleaved."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


HP = "bf16 torch.mm"


def measure_case(case: GemmCase, device: torch.device, reps: int = 10) -> dict[str, float]:
    """Seconds per call of every candidate provider of ``case`` and of the bf16 GEMM of the
    same shape, timed the same way. ``torch._int_mm`` is timed with one pass from its int32
    output to the output dtype: what its epilogue costs once Inductor fuses it."""
    # the compile that asks may be tracing with fake tensors: measure with real ones
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with unset_fake_temporarily(), disable_proxy_modes_tracing(), torch._guards.tracing(None):
        return _measure(case, device, reps)


def _measure(case: GemmCase, device: torch.device, reps: int) -> dict[str, float]:
    from fqt_compiler.ops import qmm_triton  # Triton: a CUDA device is measuring

    ops = _operands(case, device)
    a, b = ops[0], ops[4]
    fns: dict[str, Callable] = {Provider.TRITON.value: lambda: qmm_triton(*ops)}
    for provider in candidates(case)[1:]:
        if provider is Provider.INT_MM:
            fns[provider.value] = lambda: torch._int_mm(a, b).to(case.out_dtype)
        else:
            fns[provider.value] = lambda: scaled_mm_of_op_args(*ops)
    a_hp = torch.randn(case.m, case.k, device=device, dtype=torch.bfloat16)
    b_hp = torch.randn(case.n, case.k, device=device, dtype=torch.bfloat16).t()
    fns[HP] = lambda: a_hp @ b_hp
    return _median_seconds(fns, reps)


class ProviderCache:
    """Measured provider timings of one device, on disk (``providers_<device>.json`` under
    ``measured.profile_dir()``), keyed by :meth:`GemmCase.key` and the torch and Triton
    versions (an upgrade measures again)."""

    def __init__(self, device_name: str) -> None:
        self.path = profile_path(device_name).with_name(f"providers_{profile_path(device_name).name}")
        self.entries: dict[str, dict[str, float]] = {}
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except ValueError:  # a torn or foreign file: measure again and overwrite it
                self.entries = {}

    @staticmethod
    def versioned(key: str) -> str:
        import triton  # only CUDA graphs get here

        return f"{key}:torch={torch.__version__}:triton={triton.__version__}"

    def get(self, case: GemmCase) -> dict[str, float] | None:
        return self.entries.get(self.versioned(case.key()))

    def put(self, case: GemmCase, timings: dict[str, float]) -> None:
        self.entries[self.versioned(case.key())] = timings
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=1))
        os.replace(tmp, self.path)


#: What times a case: the device measurement (tests replace it; nothing else should).
MEASURE: Callable[[GemmCase, torch.device], dict[str, float]] = measure_case


@dataclass(frozen=True)
class ProviderChoice:
    """The provider one GEMM got, and the measurement behind it."""

    site_id: int
    gemm: object  # GemmKind
    provider: Provider
    timings: dict

    def describe(self, detail: str = "") -> str:
        """For the decision table: the provider (with ``detail``, e.g. its dtype pair), then its
        measured speed against the Triton GEMM and bf16."""
        mine = self.timings[self.provider.value]
        ratios = []
        if self.provider is not Provider.TRITON:
            ratios.append(f"{self.timings[Provider.TRITON.value] / mine:.2f}x triton qmm")
        if HP in self.timings:
            ratios.append(f"{self.timings[HP] / mine:.2f}x bf16")
        return f"{self.provider.value}{detail}" + (f", measured {' and '.join(ratios)}" if ratios else "")


def choose_providers(gm: fx.GraphModule) -> list[ProviderChoice]:
    """For every static plain ``fqt::qmm`` of a CUDA graph with a library candidate: measure
    (or read the measurement), and put the fastest provider in its place."""
    choices = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not qmm_op or not all_static(node):
            continue
        device = node.args[0].meta["val"].device
        case = GemmCase.of_node(node)
        options = candidates(case)
        if device.type != "cuda" or len(options) == 1:
            continue
        timings = _timings(case, device)
        best = min(options, key=lambda p: timings[p.value])
        info = node.meta.get("fqt")
        if best is not Provider.TRITON:
            inline_graph_node(gm, node, _RUNS[best])
        if info is not None:
            choices.append(ProviderChoice(info.site_id, info.gemm, best, dict(timings)))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return choices


def gemm_seconds(shape: tuple[int, int, int], a_spec, b_spec, device: torch.device) -> tuple[float, float] | None:
    """(bf16 seconds, fastest low-bit provider's seconds) of one GEMM of a site, from the cache
    or measured now; the cost model's GEMM timer on a GPU (``cost.set_gemm_timer``)."""
    if a_spec is None or b_spec is None or torch.cuda.get_device_capability(device) < (8, 9) and (
            a_spec.code_dtype != torch.int8 or b_spec.code_dtype != torch.int8):
        return None
    m, k, n = shape
    affine = a_spec.scheme.value != "sym" or b_spec.scheme.value != "sym"
    case = GemmCase(m, k, n, a_spec.code_dtype, b_spec.code_dtype, torch.bfloat16, affine, False, True)
    timings = _timings(case, device)
    return timings[HP], min(timings[p.value] for p in candidates(case))


def _timings(case: GemmCase, device: torch.device) -> dict[str, float]:
    """The case's provider timings: from this device's cache on disk, or measured and cached."""
    cache = ProviderCache(_device_name(device))
    timings = cache.get(case)
    if timings is None or any(p.value not in timings for p in candidates(case)):
        timings = MEASURE(case, device)
        cache.put(case, timings)
    return timings


set_gemm_timer(gemm_seconds)


def _device_name(device: torch.device) -> str:
    # a graph traced for CUDA on a machine without one (tests) has no device to name
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "CUDA device (traced without one)"
