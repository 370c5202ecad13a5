"""``fqt gpu-check``: the whole GPU validation as one command with a hard deadline.

A GPU is lent to this project rarely and briefly, so everything worth learning on one runs from
this single command: stages in priority order (``STAGES``), each in its own process with a time
cap, results written **as they are measured** to ``--out``:

* ``gpu_check.json``: every stage's status, seconds and measurements (ratios name their
  baseline);
* ``gpu_check.md``: the same as tables;
* ``gpu_check_logs.tar.gz``: each stage's full output.

A stage that does not fit in what is left of ``--deadline`` is recorded as skipped; one that
overruns its cap is killed and keeps what it had measured (status ``timed out``); one that
crashes keeps its measurements and its log tail (status ``failed``). A CUDA error in one stage
cannot poison the next: each runs in a fresh process (Inductor's on-disk caches still carry
compiled code from one to the next).

``--dry-run`` runs every stage on the CPU at tiny shapes (Triton's interpreter for the kernels,
Inductor off where it would only cost compile time) and measures real values there: CI runs it
so the command cannot rot between GPU sessions. Stage bodies live in ``fqt_compiler.tools.gpu_stages`` and
``fqt_compiler.tools.gpu_train``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fqt_compiler.errors import OptionsError
from fqt_compiler.measured import save_measured_fields

from fqt_compiler.tools.gpu_report import stage_tables

__all__ = ["STAGES", "GPU_SHAPES", "DRY_SHAPES", "Stage", "run_check", "summary_markdown", "add_parser"]


@dataclass(frozen=True)
class Stage:
    """One stage: its name, what it measures, and its time caps (GPU run / dry run), in seconds."""

    name: str
    what: str
    cap_s: float
    dry_cap_s: float


STAGES = (
    Stage("preflight", "device, driver and versions; one Triton launch; torch._int_mm / torch._scaled_mm probes", 30, 20),
    # the networks first: the first two H200 runs never finished the ResNet-50 (its baseline's
    # compile alone took 45 s; fqt's had not finished 100 s later), so it gets the longest cap
    Stage("conv", "a ResNet-50 training step (batch 64, 224x224) under int8 against bf16 channels-last", 220, 60),
    Stage("e2e", "a GPT-2-small training step under int8 against bf16 torch.compile", 110, 40),
    # 100 s: the quantize kernels' file alone took 58 s on the H200 (a Triton compile per case)
    Stage("tests", "the GPU-marked tests, then the kernel tests file by file, on the device", 100, 45),
    Stage("layer", "LayerNorm -> Linear -> Sigmoid fwd+bwd against the high-precision torch.compile baseline", 140, 40),
    Stage("gemm", "fqt's GEMMs alone against cuBLAS bf16, torch._int_mm and torch._scaled_mm; attention's batched GEMMs "
          "against torch.bmm; fp8 error at long K", 50, 20),
    Stage("quantize", "quantize-kernel bandwidth against a same-run device copy", 25, 15),
)
_NAMES = [s.name for s in STAGES]
# (M tokens, K in, N out), in priority order
GPU_SHAPES = [(8192, 8192, 8192), (4096, 4096, 4096), (16384, 768, 3072), (8192, 4096, 4096), (4096, 4096, 14336)]
DRY_SHAPES = [(64, 64, 96), (96, 48, 64)]
_MIN_STAGE_S = 8.0  # below this a stage cannot even import torch and its kernels: skip it
_POLL_S = 2.0
_STACKS_S = 1.5  # for a stage cut at its cap to write its threads' stacks before it is killed
JSON_NAME, MD_NAME, LOGS_NAME = "gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Results:
    """The results document, rewritten (atomically) to ``out`` whenever it changes."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out = out
        self.doc = {**header, "stages": {}}
        out.mkdir(parents=True, exist_ok=True)

    def stage(self, name: str, **fields) -> None:
        self.doc["stages"].setdefault(name, {}).update(fields)
        self.write()

    def write(self) -> None:
        self.doc["updated"] = _now()
        _atomic_write(self.out / JSON_NAME, json.dumps(self.doc, indent=1, default=str))
        _atomic_write(self.out / MD_NAME, summary_markdown(self.doc))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_partial(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-replace
        return {}


def _run_stage(stage: Stage, budget_s: float, config: dict, work: Path, results: _Results) -> None:
    """Run one stage's process for at most ``budget_s`` seconds, merging its partial results
    into ``results`` (and its log into the archive) every few seconds; record how it ended."""
    partial, log = work / f"{stage.name}.json", work / f"{stage.name}.log"
    cmd = [sys.executable, "-m", "fqt_compiler.tools.gpu_stages", stage.name, "--partial", str(partial),
           "--config", json.dumps(config)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if config["dry_run"]:
        env["TRITON_INTERPRET"] = "1"  # kernels on CPU tensors run in Triton's interpreter
    else:
        env.pop("TRITON_INTERPRET", None)
    start = time.monotonic()
    results.stage(stage.name, status="running", started=_now(), budget_s=round(budget_s, 1))
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        status = None
        while status is None:
            try:
                rc = proc.wait(timeout=_POLL_S)
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                if time.monotonic() - start > budget_s:
                    _kill(proc)
                    status = "timed out"
            results.stage(stage.name, results=_read_partial(partial), seconds=round(time.monotonic() - start, 1))
            _archive_logs(work, results.out)
    fields = {"status": status, "seconds": round(time.monotonic() - start, 1), "results": _read_partial(partial)}
    if status != "ok":
        fields["log_tail"] = log.read_text(errors="replace")[-2500:]
    results.stage(stage.name, **fields)


def _kill(proc: subprocess.Popen) -> None:
    """The stage's whole process group (pytest workers, compile workers) goes, after the
    stage's own process has written every thread's stack to its log (``SIGUSR1``, which the
    stage registers with ``faulthandler``)."""
    try:
        os.kill(proc.pid, signal.SIGUSR1)
        proc.wait(timeout=_STACKS_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _archive_logs(work: Path, out: Path) -> None:
    tmp = out / (LOGS_NAME + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for log in sorted(work.glob("*.log")):
            tar.add(log, arcname=f"gpu_check_logs/{log.name}")
    os.replace(tmp, out / LOGS_NAME)


def run_check(out: str, deadline_s: float = 420.0, stages: list[str] | None = None, shapes: list[tuple] | None = None,
              dry_run: bool = False) -> dict:
    """Run the stages in priority order within ``deadline_s`` seconds; returns the results
    document (also written to ``out``). Time a stage leaves unused is carried to the next."""
    chosen = [s for s in STAGES if stages is None or s.name in stages]
    config = {"dry_run": dry_run, "shapes": [list(s) for s in (shapes or (DRY_SHAPES if dry_run else GPU_SHAPES))],
              "root": str(Path(__file__).resolve().parent.parent)}
    header = {"schema": 1,
              "command": "fqt gpu-check " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["gpu-check"] else "run_check",
              "dry_run": dry_run, "deadline_s": deadline_s, "started": _now(), "shapes": config["shapes"],
              "stage_order": [s.name for s in chosen]}
    results = _Results(Path(out), header)
    start, carried = time.monotonic(), 0.0
    with tempfile.TemporaryDirectory(prefix="fqt_gpu_check_") as tmp:
        work = Path(tmp)
        for stage in chosen:
            left = deadline_s - (time.monotonic() - start)
            cap = (stage.dry_cap_s if dry_run else stage.cap_s) + carried
            budget = min(cap, left)
            if budget < _MIN_STAGE_S:
                results.stage(
                    stage.name, status="skipped", reason=f"did not fit: {left:.0f} s of the {deadline_s:.0f} s deadline left"
                )
                continue
            _run_stage(stage, budget, config, work, results)
            carried = max(0.0, cap - results.doc["stages"][stage.name]["seconds"])
            _archive_logs(work, results.out)
    results.doc["finished"] = _now()
    results.doc["seconds"] = round(time.monotonic() - start, 1)
    if not dry_run:
        results.doc["measured_profile"] = _save_profile(results.doc)
    results.write()
    return results.doc


def _save_profile(doc: dict) -> str:
    """Save the run's GEMM and quantize throughputs as this device's cost-model profile
    (``fqt_compiler.measured``); returns where, or why not."""
    try:
        return f"saved to {save_measured_fields(doc)}: the cost model uses it on this device from now on"
    except (OptionsError, OSError) as exc:
        return f"not saved: {exc}"


# ------------------------------------------------------------------ the markdown summary
def summary_markdown(doc: dict) -> str:
    """The results document as markdown tables (one section per stage)."""
    device = doc.get("stages", {}).get("preflight", {}).get("results", {}).get("device", {})
    lines = [
        "# fqt gpu-check" + (" (dry run on the CPU)" if doc.get("dry_run") else ""),
        "",
        f"Device: {device.get('name', 'unknown')}; "
        + ", ".join(f"{k} {device[k]}" for k in ("driver", "torch", "triton", "python") if k in device),
        f"Started {doc.get('started')}, deadline {doc.get('deadline_s')} s"
        + (f", took {doc['seconds']} s" if "seconds" in doc else " (running)"),
        "",
        "| stage | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name in doc.get("stage_order", _NAMES):
        st = doc.get("stages", {}).get(name, {})
        note = st.get("reason", "") or (st.get("log_tail", "").strip().splitlines() or [""])[-1][:120]
        lines.append(f"| {name} | {st.get('status', 'pending')} | {st.get('seconds', '')} | {note} |")
    for name in doc.get("stage_order", _NAMES):
        res = doc.get("stages", {}).get(name, {}).get("results") or {}
        if res:
            lines += ["", f"## {name}", "", *stage_tables(name, res)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ command line
def add_parser(sub) -> None:
    """The ``gpu-check`` subcommand of ``fqt``."""
    p = sub.add_parser(
        "gpu-check",
        help="the prepared GPU validation: every stage within one deadline, results written as they come",
        description="Runs the stages " + ", ".join(_NAMES) + " in that order, each in its own process with a time cap, "
        "and writes gpu_check.json, gpu_check.md and gpu_check_logs.tar.gz to --out as results arrive.",
    )
    p.add_argument("--out", default="gpu_check", help="folder for the results (default: gpu_check)")
    p.add_argument("--deadline", type=float, default=420.0, help="seconds for the whole run, start-up included (default: 420)")
    p.add_argument("--stages", nargs="+", choices=_NAMES, default=None, help="run only these stages (in priority order)")
    p.add_argument("--shapes", nargs="+", default=None, help="MxKxN shapes for the layer and gemm stages (default: the GPU list)")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny shapes (what CI runs)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from fqt_compiler.errors import OptionsError

    shapes = None
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        except ValueError:
            shapes = None
        if shapes is None or any(len(s) != 3 or min(s) <= 0 for s in shapes):
            raise OptionsError(f"--shapes takes MxKxN triples of positive integers, got {' '.join(args.shapes)}")
    if args.deadline < _MIN_STAGE_S:
        raise OptionsError(f"--deadline must leave at least {_MIN_STAGE_S:.0f} s for a stage, got {args.deadline}")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise OptionsError("fqt gpu-check needs a CUDA GPU; use --dry-run to rehearse every stage on the CPU")
    doc = run_check(args.out, args.deadline, args.stages, shapes, args.dry_run)
    print(summary_markdown(doc))
    print(f"wrote {Path(args.out) / JSON_NAME}, {Path(args.out) / MD_NAME}, {Path(args.out) / LOGS_NAME}")
    return 0 if all(s.get("status") in ("ok", "skipped") for s in doc["stages"].values()) else 1
