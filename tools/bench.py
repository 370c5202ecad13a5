"""``fqt bench``: the benchmark protocol of docs/benchmarks.md.

Every number is a ratio measured in one process against a baseline timed right beside the
candidate (interleaved repetitions, median of several). Sections:

* ``layer``: LayerNorm(no affine) -> Linear(no bias) -> Sigmoid, forward + backward with a
  given grad_output, both sides under torch.compile; candidate ``backend="fqt"`` per recipe,
  baseline fp32 (CPU) / bf16 (GPU) with the default Inductor backend, and on a CPU with bf16
  units bf16 autocast too; the range of the candidate's repetitions shows its spread;
* ``gemm``: the low-bit GEMM alone against the high-precision GEMM and ``torch._int_mm``;
* ``quantize``: the quantize path's bytes moved per second against a same-run copy (the
  Triton kernel on CUDA, the Inductor-compiled reference on CPU);
* ``memory``: bytes saved for backward by the quantized layer against the baseline;
* ``conv``: convolution layers and CIFAR networks' training steps (``bench_conv``).
* ``attention``: the attention core's two batched GEMMs, fwd+bwd (``bench_attention``).
* ``monitor``: what live numerics monitoring (``fqt.Monitor``, period 100) costs a training step (``bench_monitor``).

Sections import their kernels and Triton when they run: a CPU-only machine benchmarks
what it has.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.tools.bench_attention import attention_section
from fqt_compiler.tools.bench_compile import compile_section
from fqt_compiler.tools.bench_conv import conv_section
from fqt_compiler.tools.bench_monitor import monitor_section
from fqt_compiler.tools.timing import cpu_bf16_units, interleaved_medians, interleaved_times, spread

CPU_SHAPES = [(512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (2048, 768, 3072)]
GPU_SHAPES = [
    (m, k, n)
    for m in (8192, 16384)
    for k, n in ((768, 2304), (768, 768), (768, 3072), (3072, 768), (1024, 4096), (1280, 5120), (1600, 6400), (768, 50304))
] + [(8192, 4096, 14336), (8192, 14336, 4096), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192)]


class Layer(nn.Module):
    """The per-layer benchmark module (docs/benchmarks.md)."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(k, elementwise_affine=False)
        self.linear = nn.Linear(k, n, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(self.norm(x)))


class FusionBlock(nn.Module):
    """An MLP block, the shape of prologue fusion's work: LayerNorm -> Linear -> GELU -> Linear,
    residual add. GELU (and, backward, its derivative) produce the second GEMM's quantizer input."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(k)
        self.fc1 = nn.Linear(k, n)
        self.fc2 = nn.Linear(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {_triton_version()}"
    return (f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
            f"Inductor's vector ISA: {inductor_vec_isa()}")


def inductor_vec_isa() -> str:
    """The SIMD instruction set Inductor's C++ uses here. Inductor probes it by building and
    loading a small library in a subprocess, and silently emits scalar code when that fails (a
    module in the script's folder shadowing one of Python's own, say): CPU timings are only
    comparable between runs that report the same ISA."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    return str(isa) if isa else "none (scalar code)"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover
        return "absent"


@dataclass
class LayerResult:
    shape: tuple[int, int, int]
    recipe: str
    speedup: float  # against the first baseline (fp32 on CPUs, bf16 on GPUs)
    baseline_ms: float
    candidate_ms: float
    lowbit_gemms: int
    spread: str = ""  # fastest-slowest candidate repetition against the baseline's median
    bf16_ms: float | None = None  # CPU: the bf16-autocast baseline, where the CPU has bf16 units
    vs_bf16: float | None = None


def _training_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: bool = False) -> Callable[[], None]:
    def run():
        x.grad = None
        for p in model.parameters():
            p.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        y.backward(grad.to(y.dtype))

    return run


def bench_layer(shape, recipes, device, reps, dtype) -> list[LayerResult]:
    """fwd+bwd of :class:`Layer` per recipe against high precision timed beside it: bf16 on a
    GPU; on a CPU fp32 and, where the CPU has bf16 units, bf16 autocast (what a user picks
    instead of fp32 there; both under torch.compile)."""
    m, k, n = shape
    torch.manual_seed(0)
    base = Layer(k, n).to(device=device, dtype=dtype)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(m, n, device=device, dtype=dtype)
    torch._dynamo.reset()
    baselines = [_training_step(torch.compile(base), x, grad)]
    if device.type == "cpu" and cpu_bf16_units():
        baselines.append(_training_step(torch.compile(base), x, grad, autocast=True))
    results = []
    for name in recipes:
        cand_model = Layer(k, n).to(device=device, dtype=dtype)
        cand_model.load_state_dict(base.state_dict())
        be = fqt.backend(recipe=name)
        candidate = _training_step(torch.compile(cand_model, backend=be), x, grad)
        times = interleaved_times([*baselines, candidate], device, reps)
        t_base, t_cand = statistics.median(times[0]), statistics.median(times[-1])
        lowbit = sum(g.status is fqt.GemmStatus.LOWBIT_KERNEL for r in be.records for s in r.decisions for g in s.gemms)
        result = LayerResult(shape, name, t_base / t_cand, t_base * 1e3, t_cand * 1e3, lowbit, spread(times[-1], t_base))
        if len(baselines) == 2:
            t_bf16 = statistics.median(times[1])
            result.bf16_ms, result.vs_bf16 = t_bf16 * 1e3, t_bf16 / t_cand
        results.append(result)
    return results


def bench_fusion(shape, recipe, device, reps, dtype) -> dict[str, float]:
    """fwd+bwd of a FusionBlock: high precision, fqt unfused (``fusion="off"``) and fused
    (``"auto"``), timed interleaved; median seconds and the fused prologues counted."""
    m, k, n = shape
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    fns, backends = [], {}
    for label in ("hp", "off", "auto"):
        torch.manual_seed(0)
        model = FusionBlock(k, n).to(device=device, dtype=dtype)
        if label == "hp":
            compiled = torch.compile(model)
        else:
            backends[label] = fqt.backend(recipe=recipe, fusion=label)
            compiled = torch.compile(model, backend=backends[label])

        def run(model=model, compiled=compiled):
            x.grad = None
            for p in model.parameters():
                p.grad = None
            compiled(x).sum().backward()

        fns.append(run)
    torch._dynamo.reset()
    t_hp, t_off, t_auto = interleaved_medians(fns, device, reps)
    fused = sum(len(r.fused) for r in backends["auto"].records)
    return {"hp": t_hp, "off": t_off, "auto": t_auto, "fused": fused}


_LOW_BIT = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(all bytes autograd saves for backward, bytes of the saved activation feeding the GEMM).

    The GEMM input is the (M, K) LayerNorm output: in high precision the one saved (M, K)
    tensor that is neither the layer input nor a parameter; quantized, the saved low-bit codes
    of that shape plus their scales (tensors with a unit dim, or scalars)."""
    m, k = x.shape
    own = {x.data_ptr(), *(p.data_ptr() for p in model.parameters())}
    total = gemm_input = 0

    def pack(t: torch.Tensor):
        nonlocal total, gemm_input
        size = t.numel() * t.element_size()
        total += size
        if t.data_ptr() in own:
            return t
        if tuple(t.shape) in ((m, k), (k, m)) and (t.dtype in _LOW_BIT or t.dtype == x.dtype):
            gemm_input += size
        elif t.dtype == torch.float32 and (t.dim() == 0 or 1 in t.shape) and t.numel() in (1, m, k):
            gemm_input += size  # scales / zero points of the saved codes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total, gemm_input


def bench_memory(shape, recipe, device) -> tuple[tuple[int, int], tuple[int, int]]:
    """Saved bytes (total, GEMM input) of the bf16 baseline and of fqt."""
    m, k, n = shape
    torch._dynamo.reset()
    base = Layer(k, n).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = saved_bytes(torch.compile(base), x)
    cand = Layer(k, n).to(device=device, dtype=torch.bfloat16)
    c = saved_bytes(torch.compile(cand, backend=fqt.backend(recipe=recipe)), x)
    return b, c


def bench_gemm(shape, device, reps) -> dict[str, float]:
    """Seconds of the fp32/bf16 GEMM, torch._int_mm and fqt's int8 GEMM with its epilogue."""
    from fqt_compiler.ops import qmm_op
    from fqt_compiler.grid import QOperand

    torch._dynamo.reset()
    m, k, n = shape
    hp = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(m, k, device=device, dtype=hp)
    b = torch.randn(k, n, device=device, dtype=hp)
    qa = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
    qb = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8).t()
    sa = torch.rand(m, 1, device=device)
    sb = torch.rand(1, n, device=device)
    if device.type == "cpu":
        # what kernels mode runs on CPU: torch._int_mm with the epilogue fused by Inductor
        from fqt_compiler.ops import qmm_cpu

        fused = torch.compile(qmm_cpu)

        def low_bit():
            return fused(QOperand(qa, sa), QOperand(qb, sb), None, hp)
    else:

        def low_bit():
            return qmm_op(qa, sa, None, None, qb, sb, None, None, None, hp)

    fns = [lambda: a @ b, lambda: torch._int_mm(qa, qb), low_bit]
    t_hp, t_int, t_q = interleaved_medians(fns, device, reps)
    flops = 2 * m * k * n
    return {"hp": t_hp, "int_mm": t_int, "fqt": t_q, "tflops_fqt": flops / t_q / 1e12, "tflops_hp": flops / t_hp / 1e12}


QUANTIZE_SHAPES = {"cuda": [(16384, 16384), (16384, 768)], "cpu": [(4096, 4096), (16384, 768)]}


def bench_quantize(shape, spec, device, reps) -> dict[str, float]:
    """Bytes moved per second by the quantize path kernels mode runs (Triton on CUDA, the
    Inductor-compiled reference on CPU), against a same-run device-to-device copy."""
    from fqt_compiler.layout import Layout
    from fqt_compiler.reference import quantize_ref

    torch._dynamo.reset()
    hp = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(shape, device=device, dtype=hp)
    if device.type == "cuda":
        from fqt_compiler.codegen.kernels.quantize import quantize

        def run_q():
            return quantize(x, spec, Layout.PENULTIMATE)
    else:
        compiled = torch.compile(lambda t: quantize_ref(t, spec, Layout.PENULTIMATE))

        def run_q():
            return compiled(x)

    out = run_q()
    dst = torch.empty_like(x)
    t_q, t_copy = interleaved_medians([run_q, lambda: dst.copy_(x)], device, reps)
    moved = x.numel() * x.element_size() + sum(t.numel() * t.element_size() for t in out)
    copy_bytes = 2 * x.numel() * x.element_size()
    return {"gbps": moved / t_q / 1e9, "copy_gbps": copy_bytes / t_copy / 1e9}


def run(sections: list[str], device_name: str, reps: int, recipes: list[str], shapes: list[tuple[int, int, int]] | None) -> str:
    """The markdown report of ``sections`` (see SECTIONS), each a ratio against a baseline timed beside it."""
    device = torch.device(device_name)
    shapes = shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = [f"# fqt bench\n\ndevice: {device_description(device)}\n"]
    for name in SECTIONS:
        if name in sections:
            out += _SECTION_BUILDERS[name](shapes, recipes, device, reps, dtype)
    return "\n".join(out) + "\n"


def _layer_section(shapes: list, recipes: list[str], device: torch.device, reps: int, dtype: torch.dtype) -> list[str]:
    """The ``layer`` section's markdown."""
    parts: list[str] = []
    rows = []
    bf16 = device.type == "cpu" and cpu_bf16_units()
    for shape in shapes:
        for r in bench_layer(shape, recipes, device, reps, dtype):
            row = [f"{r.shape[0]}x{r.shape[1]}->{r.shape[2]}", r.recipe, f"{r.speedup:.2f}x", r.spread]
            if bf16:
                row += [f"{r.vs_bf16:.2f}x", f"{r.bf16_ms:.1f}"]
            rows.append(row + [f"{r.baseline_ms:.1f}", f"{r.candidate_ms:.1f}", r.lowbit_gemms])
            print(f"  layer {rows[-1]}", flush=True)
    base = "fp32" if device.type == "cpu" else "bf16"
    parts.append(f"## Per layer, fwd+bwd, vs {base} torch.compile (median of {reps} interleaved)\n")
    if device.type == "cpu":
        parts.append("The CPU has bf16 units: the bf16-autocast columns time the same layer under `torch.autocast('cpu', "
                     "torch.bfloat16)`, what a user picks instead of fp32 there.\n" if bf16 else
                     "This CPU has no bf16 units (no AVX-512 BF16 or AMX BF16 flag): no bf16-autocast baseline.\n")
    headers = ["M x K -> N", "recipe", f"vs {base}", f"range vs {base}"]
    headers += ["vs bf16 autocast", "bf16 autocast ms"] if bf16 else []
    parts.append(tabulate(rows, headers=headers + [f"{base} ms", "fqt ms", "low-bit GEMMs"], tablefmt="github"))
    return parts


def _fusion_section(shapes: list, recipes: list[str], device: torch.device, reps: int, dtype: torch.dtype) -> list[str]:
    """The ``fusion`` section's markdown."""
    parts: list[str] = []
    rows = []
    for shape in shapes:
        for name in recipes:
            f = bench_fusion(shape, name, device, reps, dtype)
            rows.append([f"{shape[0]}x{shape[1]}<->{shape[2]}", name, f"{f['off'] / f['auto']:.2f}x",
                         f"{f['hp'] / f['auto']:.2f}x", f"{f['hp'] / f['off']:.2f}x", f"{1e3 * f['auto']:.1f}",
                         f"{1e3 * f['off']:.1f}", f["fused"]])
            print(f"  fusion {rows[-1]}", flush=True)
    how = "generated Triton prologue kernels" if device.type == "cuda" else "Inductor fusing the inlined quantizers"
    base = "fp32" if device.type == "cpu" else "bf16"
    parts.append(f"\n## Fusion: MLP block fwd+bwd, fused ({how}) vs unfused (standalone quantizers)\n")
    parts.append(tabulate(rows, headers=["M x K <-> N", "recipe", "fused vs unfused", f"fused vs {base}", f"unfused vs {base}",
                                       "fused ms", "unfused ms", "generated kernels"], tablefmt="github"))
    return parts


def _gemm_section(shapes: list, recipes: list[str], device: torch.device, reps: int, dtype: torch.dtype) -> list[str]:
    """The ``gemm`` section's markdown."""
    parts: list[str] = []
    rows = []
    for shape in shapes:
        g = bench_gemm(shape, device, reps)
        rows.append([f"{shape[0]}x{shape[1]}x{shape[2]}", f"{g['hp'] / g['fqt']:.2f}x", f"{g['int_mm'] / g['fqt']:.2f}",
                     f"{g['tflops_fqt']:.3g}", f"{g['tflops_hp']:.3g}"])
        print(f"  gemm {rows[-1]}", flush=True)
    parts.append("\n## GEMM alone: fqt int8 (with epilogue) vs the high-precision GEMM and torch._int_mm\n")
    parts.append(tabulate(
        rows, headers=["M x K x N", "vs hp GEMM", "int_mm time / fqt time", "fqt TFLOPS", "hp TFLOPS"], tablefmt="github"
    ))
    return parts


def _quantize_section(shapes: list, recipes: list[str], device: torch.device, reps: int, dtype: torch.dtype) -> list[str]:
    """The ``quantize`` section's markdown."""
    parts: list[str] = []
    rows = []
    specs = {
        "int8 row": fqt.QuantSpec(granularity="row"), "int8 row SR": fqt.QuantSpec(granularity="row", rounding="stochastic")
    }
    for shape in QUANTIZE_SHAPES["cuda" if device.type == "cuda" else "cpu"]:
        for label, spec in specs.items():
            q = bench_quantize(shape, spec, device, reps)
            rows.append([f"{shape[0]}x{shape[1]}", label, f"{q['gbps']:.1f}", f"{q['copy_gbps']:.1f}",
                         f"{q['gbps'] / q['copy_gbps']:.2f}"])
            print(f"  quantize {rows[-1]}", flush=True)
    what = "Triton quantize kernel" if device.type == "cuda" else "Inductor-compiled reference quantizer"
    parts.append(f"\n## Quantize ({what}): bytes moved per second vs a same-run copy\n")
    parts.append(tabulate(rows, headers=["shape", "spec", "GB/s", "copy GB/s", "fraction of copy"], tablefmt="github"))
    return parts


def _memory_section(shapes: list, recipes: list[str], device: torch.device, reps: int, dtype: torch.dtype) -> list[str]:
    """The ``memory`` section's markdown."""
    parts: list[str] = []
    rows = []
    # distinct M, K, N: the saved GEMM input is then told apart from other saved tensors
    for shape in [s for s in shapes if len(set(s)) == 3] or [(2048, 768, 3072)]:
        for name in recipes:
            (b_all, b_in), (c_all, c_in) = bench_memory(shape, name, device)
            rows.append(
                [f"{shape[0]}x{shape[1]}->{shape[2]}", name, b_in, c_in, f"{c_in / b_in:.2f}", f"{c_all / b_all:.2f}"]
            )
            print(f"  memory {rows[-1]}", flush=True)
    parts.append("\n## Bytes saved for backward, fqt vs bf16 torch.compile\n")
    parts.append(
        tabulate(
            rows,
            headers=[
                "shape", "recipe", "bf16 GEMM-input bytes", "fqt GEMM-input bytes", "GEMM-input ratio", "all saved, ratio"
            ],
            tablefmt="github",
        )
    )
    return parts


SECTIONS = ("layer", "fusion", "gemm", "quantize", "memory", "conv", "attention", "monitor", "compile")
_SECTION_BUILDERS = {
    "layer": _layer_section, "fusion": _fusion_section, "gemm": _gemm_section, "quantize": _quantize_section,
    "memory": _memory_section, "conv": conv_section, "attention": attention_section, "monitor": monitor_section,
    "compile": compile_section,
}
