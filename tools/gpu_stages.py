"""The stages of ``fqt gpu-check`` (``fqt_compiler.tools.gpu_check``), each run in its own process:

    python -m fqt_compiler.tools.gpu_stages STAGE --partial FILE --config JSON

A stage writes what it measures to ``FILE`` as it goes (``Recorder``), so a stage killed at its
time cap still reports everything it finished. This module holds ``preflight``, ``tests``,
``gemm`` and ``quantize``; the model stages ``layer`` and ``e2e`` are in ``fqt_compiler.tools.gpu_train``,
``conv`` in ``fqt_compiler.tools.gpu_conv``.
On the CPU (``--dry-run``) the same code runs at tiny shapes, Triton kernels in the interpreter.

Each stage imports what it measures inside its function: a stage's import failure is that
stage's recorded error, not the end of the check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from fqt_compiler.tools import gpu_conv, gpu_train
from fqt_compiler.tools.gpu_common import Recorder, peaks, sig, stage_device

__all__ = ["STAGE_FUNCTIONS", "device_facts", "scaled_mm", "main"]

# ------------------------------------------------------------------ preflight
def device_facts(device: torch.device) -> dict:
    """What the run ran on: device name, driver, versions."""
    import numpy
    import triton

    facts = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
             "numpy": numpy.__version__, "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(name=torch.cuda.get_device_name(device),
                     capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                     multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                     cuda_runtime=torch.version.cuda, driver=_driver_version())
    else:
        facts.update(name=_cpu_model(), cores=os.cpu_count(), threads=torch.get_num_threads())
    return facts


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return (out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip()
                else f"unknown (nvidia-smi exit {out.returncode})")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_launch(device: torch.device) -> dict:
    """One fqt Triton kernel launched on the device, against its reference."""
    from fqt_compiler.codegen.kernels.quantize import quantize
    from fqt_compiler.layout import Layout
    from fqt_compiler.reference import quantize_ref
    from fqt_compiler.specs import QuantSpec

    x = torch.randn(64, 96, device=device)
    spec = QuantSpec(granularity="row")
    t0 = time.perf_counter()
    got = quantize(x, spec, Layout.PENULTIMATE)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ref = quantize_ref(x, spec, Layout.PENULTIMATE)
    same = all(torch.equal(g, r) for g, r in zip(got, ref))
    return {
        "kernel": "fqt_compiler.codegen.kernels.quantize (int8, per row)", "first_launch_s": round(seconds, 3), "bit_exact": same
    }


def scaled_mm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, fast_accum: bool = False) -> torch.Tensor:
    """``torch._scaled_mm`` to bf16 (A row-major, B column-major, scales per tensor or per row/column)."""
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def _probe(fn) -> dict:
    try:
        return {"ok": True, **fn()}
    except Exception as exc:  # a probe reports what failed; it never stops the stage
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def _probes(device: torch.device) -> dict:
    m, k, n = 32, 64, 48
    g = torch.Generator(device="cpu").manual_seed(0)

    def int_mm():
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(device)
        b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device).t()
        return {"rel_err": _rel_err(torch._int_mm(a, b), a.double() @ b.double())}

    def scaled(a_dtype, b_dtype, rowwise):
        def run():
            a = torch.randn(m, k, generator=g).to(device).to(a_dtype)
            b = torch.randn(n, k, generator=g).to(device).to(b_dtype).t()
            sa = (torch.rand(m, 1, generator=g) + 0.5).to(device) if rowwise else torch.tensor(0.7, device=device)
            sb = (torch.rand(1, n, generator=g) + 0.5).to(device) if rowwise else torch.tensor(1.3, device=device)
            ref = (a.double() * sa.double()) @ (b.double() * sb.double())
            return {"rel_err": _rel_err(scaled_mm(a, b, sa, sb), ref)}
        return run

    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    return {
        "torch._int_mm int8": _probe(int_mm),
        "torch._scaled_mm e4m3 x e4m3, tensor-wise": _probe(scaled(e4, e4, False)),
        "torch._scaled_mm e5m2 x e4m3, tensor-wise": _probe(scaled(e5, e4, False)),
        "torch._scaled_mm e4m3 x e4m3, row-wise": _probe(scaled(e4, e4, True)),
        "torch._scaled_mm e5m2 x e4m3, row-wise": _probe(scaled(e5, e4, True)),
    }


def preflight(rec: Recorder, cfg: dict) -> None:
    device = stage_device(cfg)
    rec.set("device", device_facts(device))
    rec.set("peaks", peaks(device) or "no datasheet peaks for this device")
    rec.set("triton_launch", _probe(lambda: _triton_launch(device)))
    rec.set("probes", _probes(device))


# ------------------------------------------------------------------ tests
def tests(rec: Recorder, cfg: dict) -> None:
    """The GPU-marked tests, then the kernel tests file by file (on CUDA tensors on a GPU; under
    the interpreter, the GEMM's file only, in a dry run); per run, recorded as it finishes:
    counts, failures and skip reasons. pytest writes straight into the stage log, so a run cut
    at the stage's cap still shows how far it got."""
    import importlib.util
    import tempfile

    # A dry run rehearses the mechanism (the suite runs these files in full anyway): the GPU
    # marker collected from the kernel tests only, and the GEMM file's split-K tests.
    files = (["test_qmm_kernel.py"] if cfg["dry_run"]
             else ["test_conv_triton.py", "test_qbmm_kernel.py", "test_qmm_kernel.py", "test_fused_kernel.py",
                   "test_bhq_kernel.py", "test_quantize_kernel.py"])
    parallel = ["-n", "8"] if not cfg["dry_run"] and importlib.util.find_spec("xdist") else []
    narrow = ["-k", "split_k"] if cfg["dry_run"] else []
    # the GPU-marked tests first (no device run has reached them yet), the quantize kernels'
    # file last (all 91 passed on the H200 in the first runs)
    kernel_runs = [(f"kernel tests: {f}", ["-m", "not gpu", *narrow, f"tests/kernels/{f}"]) for f in files]
    gpu_marked = ("gpu-marked tests", ["-m", "gpu", *_gpu_marked_files(Path(cfg["root"]), cfg["dry_run"])])
    runs = [gpu_marked, *kernel_runs]
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in runs:
            xml = Path(tmp) / "junit.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--tier", "all", f"--junitxml={xml}",
                   *parallel, *args]
            print(f"$ {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            # failures land in their own log as they happen (archived with the stage logs)
            env = dict(os.environ, FQT_FAILURE_LOG=str(rec.path.with_name("tests_failures.log")),
                       FQT_OUTCOME_LOG=str(rec.path.with_name("tests_outcomes.log")))
            env.pop("PYTEST_XDIST_WORKER", None)  # its own session, also when this runs inside a test
            proc = subprocess.run(cmd, cwd=cfg["root"], env=env)
            summary = _junit_summary(xml) if xml.exists() else {"error": "pytest wrote no report (see the stage log)"}
            xml.unlink(missing_ok=True)
            rec.add("runs", {"run": label, "command": " ".join(cmd[1:]), "exit": proc.returncode,
                             "seconds": round(time.perf_counter() - t0, 1), **summary})


def _gpu_marked_files(root: Path, dry_run: bool) -> list[str]:
    """The test files that mark tests ``gpu``: pytest then imports those alone (collecting the
    whole suite took most of the first run's 70 s). A dry run: the kernel tests' only."""
    tests = root / "tests" / ("kernels" if dry_run else "")
    return sorted(str(p.relative_to(root)) for p in tests.rglob("test_*.py") if "mark.gpu" in p.read_text())


def _junit_summary(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skip_reasons = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for child in case:
            if child.tag in ("failure", "error"):
                failed.append({"test": name, "message": (child.get("message") or "")[:400]})
            elif child.tag == "skipped":
                reason = (child.get("message") or "")[:160]
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skip_reasons": skip_reasons}


# ------------------------------------------------------------------ gemm
def _gemm_shapes(m: int, k: int, n: int) -> list[tuple[str, int, int, int]]:
    """The three GEMMs of a Linear (M tokens, K in, N out) as (role, rows, contraction, cols)."""
    return [("fprop", m, k, n), ("dgrad", m, n, k), ("wgrad", n, m, k)]


def _gemm_candidates(rows: int, red: int, cols: int, role: str, device: torch.device, probes: dict) -> dict:
    """Callables for one GEMM: high precision, fqt int8 / fp8 (the Triton qmm), the library
    8-bit GEMMs. Operands K-major, as fqt's quantizers write them."""
    from fqt_compiler.codegen.kernels.qmm import qmm
    from fqt_compiler.grid import QOperand

    hp = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(rows + red + cols)  # drawn on the device: large shapes in milliseconds
    a = torch.randn(rows, red, generator=g, device=device)
    b = torch.randn(cols, red, generator=g, device=device).t()  # (red, cols), column-major
    a_hp, b_hp = a.to(hp), b.to(hp)
    a8 = torch.randint(-127, 128, (rows, red), generator=g, device=device, dtype=torch.int8)
    b8 = torch.randint(-127, 128, (cols, red), generator=g, device=device, dtype=torch.int8).t()
    sa = torch.rand(rows, 1, generator=g, device=device) + 0.5
    sb = torch.rand(1, cols, generator=g, device=device) + 0.5
    a_fmt = torch.float8_e4m3fn if role == "fprop" else torch.float8_e5m2  # gradients are e5m2 in the fp8 recipe
    af, bf = a.to(a_fmt), b.to(torch.float8_e4m3fn)
    fns = {
        f"{str(hp).split('.')[-1]} torch.mm": lambda: a_hp @ b_hp,
        "fqt int8 (triton qmm)": lambda: qmm(QOperand(a8, sa), QOperand(b8, sb), None, hp),
        "torch._int_mm": lambda: torch._int_mm(a8, b8),
        f"fqt fp8 {'e4m3' if role == 'fprop' else 'e5m2'} x e4m3 (triton qmm)":
            lambda: qmm(QOperand(af, sa), QOperand(bf, sb), None, hp),
    }
    row_ok = probes.get(f"torch._scaled_mm {'e4m3' if role == 'fprop' else 'e5m2'} x e4m3, row-wise", {}).get("ok")
    tensor_ok = probes.get(f"torch._scaled_mm {'e4m3' if role == 'fprop' else 'e5m2'} x e4m3, tensor-wise", {}).get("ok")
    if row_ok:
        fns["torch._scaled_mm row-wise"] = lambda: scaled_mm(af, bf, sa, sb)
    elif tensor_ok:
        one = torch.tensor(1.0, device=device)
        fns["torch._scaled_mm tensor-wise"] = lambda: scaled_mm(af, bf, one, one)
    return fns


def gemm(rec: Recorder, cfg: dict) -> None:
    from fqt_compiler.tools.timing import interleaved_medians

    device = stage_device(cfg)
    pk = peaks(device)
    probes = _probes(device)
    reps = 3 if cfg["dry_run"] else 10
    rec.set(
        "baseline", "the high-precision GEMM of the same shape (bf16 torch.mm on CUDA: cuBLAS; fp32 on CPU), timed interleaved"
    )
    for m, k, n in cfg["shapes"]:
        for role, rows, red, cols in _gemm_shapes(m, k, n):
            fns = _gemm_candidates(rows, red, cols, role, device, probes)
            names = list(fns)
            times = interleaved_medians([fns[x] for x in names], device, reps)
            flops = 2.0 * rows * red * cols
            for name, t in zip(names, times):
                item = {"shape": [m, k, n], "role": role, "gemm": [rows, red, cols], "kernel": name, "ms": sig(t * 1e3),
                        "tflops": sig(flops / t / 1e12), "vs_high_precision": sig(times[0] / t)}
                if pk:
                    peak = pk["bf16_tflops"] if name == names[0] else pk["int8_tflops"]
                    item["pct_of_peak"] = sig(100 * flops / t / 1e12 / peak, 3)
                rec.add("items", item)
    _batched(rec, device, reps, cfg["dry_run"])
    rec.set("fp8_accuracy", _fp8_accuracy(device, cfg))


# GPT-2 small's attention at batch 8, T = 1024: (batch x heads, M, K, N) of Q K^T and of P V
_ATTENTION = [("scores Q K^T", 96, 1024, 64, 1024), ("context P V", 96, 1024, 1024, 64)]
_DRY_ATTENTION = [("scores Q K^T", 4, 32, 16, 32), ("context P V", 4, 32, 32, 16)]


def _batched(rec: Recorder, device: torch.device, reps: int, dry_run: bool) -> None:
    """Attention's batched GEMMs: fqt's ``qbmm`` (int8, per-row / per-column scales) against the
    high-precision ``torch.bmm`` of the same shape, timed interleaved."""
    from fqt_compiler.codegen.kernels.qbmm import qbmm
    from fqt_compiler.grid import QOperand
    from fqt_compiler.tools.timing import interleaved_medians

    hp = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, batch, m, k, n in _DRY_ATTENTION if dry_run else _ATTENTION:
        g = torch.Generator(device=device).manual_seed(batch + m + k + n)
        a, b = torch.randn(batch, m, k, generator=g, device=device), torch.randn(batch, k, n, generator=g, device=device)
        a8 = torch.randint(-127, 128, (batch, m, k), generator=g, device=device, dtype=torch.int8)
        b8 = torch.randint(-127, 128, (batch, k, n), generator=g, device=device, dtype=torch.int8)
        sa, sb = torch.rand(batch, m, 1, device=device) + 0.5, torch.rand(batch, 1, n, device=device) + 0.5
        a_hp, b_hp = a.to(hp), b.to(hp)
        t_hp, t_q = interleaved_medians([lambda: torch.bmm(a_hp, b_hp), lambda: qbmm(QOperand(a8, sa), QOperand(b8, sb), hp)],
                                        device, reps)
        rec.add("batched", {"gemm": name, "shape": [batch, m, k, n], "baseline": f"{str(hp).split('.')[-1]} torch.bmm",
                            "baseline_ms": sig(t_hp * 1e3), "fqt_int8_qbmm_ms": sig(t_q * 1e3), "speedup": sig(t_hp / t_q)})


def _fp8_accuracy(device: torch.device, cfg: dict) -> dict:
    """The fp8 backward GEMM (e5m2 x e4m3) at the longest contraction of the shapes, against a
    float64 GEMM of the same fp8 values: relative Frobenius and max errors (qmm promotes its fp8
    accumulator once per K tile; ``torch._scaled_mm`` shown with and without fast accumulation)."""
    from fqt_compiler.codegen.kernels.qmm import FP8_PROMOTE_K, qmm
    from fqt_compiler.grid import QOperand

    m, k, n = max(cfg["shapes"], key=lambda s: s[0])
    rows, red, cols = n, m, k  # the weight gradient: contraction over the M tokens
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(rows, red, generator=g, device=device).to(torch.float8_e5m2)
    b = torch.randn(cols, red, generator=g, device=device).to(torch.float8_e4m3fn).t()
    one_a, one_b = torch.ones(rows, 1, device=device), torch.ones(1, cols, device=device)
    ref = a.double() @ b.double()
    out = {"gemm": [rows, red, cols], "operands": "e5m2 x e4m3 (weight gradient)",
           "baseline": "float64 GEMM of the same fp8 values", "qmm_promote_every_k": FP8_PROMOTE_K}

    def err(got):
        d = got.double() - ref
        return {"rel_fro": float(d.norm() / ref.norm()), "max_rel": float(d.abs().max() / ref.abs().max())}

    out["fqt qmm (fp32 out)"] = _probe(lambda: err(qmm(QOperand(a, one_a), QOperand(b, one_b), None, torch.float32)))
    for fast in (False, True):
        one = torch.tensor(1.0, device=device)
        out[f"torch._scaled_mm (bf16 out), use_fast_accum={fast}"] = _probe(
            lambda fast=fast: err(scaled_mm(a, b, one, one, fast))
        )
    return out


# ------------------------------------------------------------------ quantize
def quantize(rec: Recorder, cfg: dict) -> None:
    """Bytes moved per second by the quantize kernel (input read, codes and scales written)
    as a share of a same-run device-to-device copy of the input."""
    from fqt_compiler.codegen.kernels.quantize import quantize as quantize_kernel
    from fqt_compiler.layout import Layout
    from fqt_compiler.specs import QuantSpec

    from fqt_compiler.tools.timing import interleaved_medians

    device = stage_device(cfg)
    pk = peaks(device)
    # the interpreter runs one kernel program at a time: a dry run's shapes are one row tile high
    shapes = [(16, 128), (16, 48)] if cfg["dry_run"] else [(16384, 16384), (16384, 768)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    specs = {"int8 per row": QuantSpec(granularity="row"),
             "int8 per row, stochastic": QuantSpec(granularity="row", rounding="stochastic"),
             "int8 per tensor": QuantSpec(),
             "fp8 e4m3 per row": QuantSpec(format="fp8_e4m3", granularity="row")}
    rec.set("baseline", "a same-run device-to-device copy of the input (bytes read + written)")
    for rows, cols in shapes:
        x = torch.randn(rows, cols, device=device, dtype=dtype)
        y = torch.empty_like(x)
        for label, spec in specs.items():
            outs = quantize_kernel(x, spec, Layout.PENULTIMATE)
            moved = x.numel() * x.element_size() + sum(o.numel() * o.element_size() for o in outs)
            t_copy, t_q = interleaved_medians([lambda: y.copy_(x), lambda: quantize_kernel(x, spec, Layout.PENULTIMATE)],
                                              device, 2 if cfg["dry_run"] else 20)
            copy_bw, q_bw = 2 * x.numel() * x.element_size() / t_copy, moved / t_q
            item = {"shape": [rows, cols], "dtype": str(dtype).split(".")[-1], "spec": label, "ms": sig(t_q * 1e3),
                    "gb_s": sig(q_bw / 1e9), "copy_gb_s": sig(copy_bw / 1e9), "pct_of_copy": sig(100 * q_bw / copy_bw, 3)}
            if pk:
                item["pct_of_hbm_peak"] = sig(100 * q_bw / (pk["hbm_tbs"] * 1e12), 3)
            rec.add("items", item)


# ------------------------------------------------------------------ entry
STAGE_FUNCTIONS = {"preflight": preflight, "tests": tests, "layer": gpu_train.layer, "gemm": gemm,
                   "quantize": quantize, "conv": gpu_conv.conv, "e2e": gpu_train.e2e}


def _show_progress() -> None:
    """What a stage cut at its cap leaves in its log: fqt's passes as they finish, timed from
    the stage's start, and every thread's stack when ``fqt gpu-check`` signals the cut
    (``SIGUSR1``) -- where the time went, not only that it ran out."""
    import faulthandler
    import logging
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(relativeCreated)9.0f ms %(name)s: %(message)s"))
    passes = logging.getLogger("fqt_compiler.passes")
    passes.addHandler(handler)
    passes.setLevel(logging.DEBUG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fqt_compiler.tools.gpu_stages", description="one stage of fqt gpu-check")
    parser.add_argument("stage", choices=list(STAGE_FUNCTIONS))
    parser.add_argument("--partial", required=True, help="JSON file the stage writes its results to as it goes")
    parser.add_argument("--config", required=True, help="the run's configuration (JSON)")
    args = parser.parse_args(argv)
    cfg = json.loads(args.config)
    _show_progress()
    torch.manual_seed(0)
    STAGE_FUNCTIONS[args.stage](Recorder(args.partial), cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
