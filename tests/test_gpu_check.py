"""``fqt gpu-check``: the dry run measures every stage on the CPU (CI runs it, so the command a
GPU session runs first cannot rot); the deadline and the stage caps cut and skip as documented;
results reach the output folder while stages run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from fqt_compiler.tools import cli, gpu_check
from fqt_compiler.tools.gpu_check import JSON_NAME, LOGS_NAME, MD_NAME, Stage, run_check, summary_markdown

ALL = [s.name for s in gpu_check.STAGES]


def DRY(test):
    """A dry run drives Triton's interpreter on CPU tensors, and takes about a minute."""
    return pytest.mark.slow(pytest.mark.interpreter(test))



@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One full dry run in a fresh process, as CI and a user run it: (results, out folder, seconds)."""
    out = tmp_path_factory.mktemp("gpu_check")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fqt_compiler.tools.cli", "gpu-check", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / JSON_NAME).read_text()), out, seconds


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@DRY
def test_dry_run_fits_its_budget_and_every_stage_passes(dry_run):
    doc, _, seconds = dry_run
    assert seconds < 180, f"the dry run must stay under three minutes, took {seconds:.0f} s"
    assert doc["dry_run"] is True and doc["stage_order"] == ALL
    assert {name: doc["stages"][name]["status"] for name in ALL} == {name: "ok" for name in ALL}


@DRY
def test_dry_run_preflight_and_tests(dry_run):
    doc, _, _ = dry_run
    pre = doc["stages"]["preflight"]["results"]
    assert pre["device"]["torch"] == torch.__version__ and pre["device"]["name"]
    assert pre["triton_launch"]["ok"] and pre["triton_launch"]["bit_exact"]
    assert pre["probes"]["torch._int_mm int8"] == {"ok": True, "rel_err": 0.0}
    assert len(pre["probes"]) == 5  # int_mm and the four torch._scaled_mm combinations
    runs = doc["stages"]["tests"]["results"]["runs"]
    assert [r["run"] for r in runs] == ["gpu-marked tests", "kernel tests: test_qmm_kernel.py"]
    assert runs[0]["tests"] > 0 and runs[0]["skipped"] == runs[0]["tests"]  # no GPU here: all skip
    assert runs[1]["passed"] > 0 and runs[1]["failures"] == runs[1]["errors"] == 0


@DRY
def test_dry_run_measures_layer_gemm_quantize_conv_e2e(dry_run):
    doc, _, _ = dry_run
    layer = doc["stages"]["layer"]["results"]
    assert [(i["recipe"], i["fusion"]) for i in layer["items"]] == [("int8", "auto"), ("fp8", "auto"), ("int8", "off")]
    for item in layer["items"]:
        assert _finite_positive(item["speedup"]) and item["baseline"] == layer["baseline"]
        assert item["fqt_step_profile"]["top_level_ops"] > 0 and _finite_positive(item["fqt_step_profile"]["host_ms"])
        # a dry run compiles without Inductor: every fqt op is a Python call, and says why
        assert [launch["stage"] for launch in item["fqt_launches"]] == ["forward", "backward"]
        assert all(why for launch in item["fqt_launches"] for _, why in launch["python_calls"])
    assert layer["items"][0]["lowbit_gemms"] == 3  # fprop, dgrad, wgrad of the one Linear
    gemm = doc["stages"]["gemm"]["results"]
    roles = {(tuple(i["shape"]), i["role"]) for i in gemm["items"]}
    assert len(roles) == 3 * len(doc["shapes"])
    assert all(_finite_positive(i["tflops"]) and _finite_positive(i["vs_high_precision"]) for i in gemm["items"])
    assert [i["gemm"] for i in gemm["batched"]] == ["scores Q K^T", "context P V"]
    assert all(_finite_positive(i["speedup"]) for i in gemm["batched"])
    acc = gemm["fp8_accuracy"]["fqt qmm (fp32 out)"]
    assert acc["ok"] and acc["rel_fro"] < 1e-5
    quant = doc["stages"]["quantize"]["results"]["items"]
    assert len(quant) == 8 and all(_finite_positive(i["pct_of_copy"]) for i in quant)
    layer = doc["stages"]["conv"]["results"]["layer"]
    assert _finite_positive(layer["speedup"]) and layer["lowbit_gemms"] == 3  # fprop, dgrad, wgrad
    conv = doc["stages"]["conv"]["results"]["items"]
    assert [i["recipe"] for i in conv] == ["int8"] and _finite_positive(conv[0]["speedup"])
    assert conv[0]["lowbit_gemms"] == conv[0]["gemms"] > 50  # every convolution GEMM and the classifier's
    e2e = doc["stages"]["e2e"]["results"]
    assert _finite_positive(e2e["comparison"]["tokens_per_s_ratio"]) and "baseline" in e2e["comparison"]
    for run in ("baseline", "fqt int8"):
        assert len(e2e[run]["losses"]) == e2e["config"]["steps"] and all(map(math.isfinite, e2e[run]["losses"]))
    assert e2e["fqt int8"]["lowbit_gemms"] > 0


@DRY
def test_dry_run_writes_summary_and_logs(dry_run):
    doc, out, _ = dry_run
    md = (out / MD_NAME).read_text()
    assert "dry run on the CPU" in md and all(f"## {name}" in md for name in ALL)
    with tarfile.open(out / LOGS_NAME) as tar:
        names = sorted(m.name.rsplit("/", 1)[-1] for m in tar.getmembers())
        assert names == sorted([f"{n}.log" for n in ALL] + ["tests_outcomes.log"])
        outcomes = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("tests_outcomes.log"))).read().decode()
    # one line per test as it finished, once each though pytest-xdist reports every test twice
    lines = outcomes.splitlines()
    assert any(line.startswith("PASSED tests/kernels/test_qmm_kernel.py::") for line in lines)
    assert any(line.startswith("SKIPPED tests/") for line in lines)  # the GPU-marked tests, on a CPU
    assert len(lines) == len(set(lines))
    assert sorted(p.name for p in out.iterdir()) == sorted([JSON_NAME, MD_NAME, LOGS_NAME])  # three files, as the device returns


@DRY
def test_a_stage_over_its_cap_is_cut_and_keeps_what_it_measured(tmp_path, monkeypatch):
    """The tests stage runs two pytest sessions; capped at 9 s it is killed during the second
    (with its pytest process group) and reports the first."""
    monkeypatch.setattr(gpu_check, "STAGES", (Stage("tests", "", cap_s=9, dry_cap_s=9),))
    t0 = time.perf_counter()
    doc = run_check(str(tmp_path), deadline_s=60, dry_run=True)
    assert time.perf_counter() - t0 < 30
    st = doc["stages"]["tests"]
    assert st["status"] == "timed out" and "log_tail" in st
    assert "most recent call first" in st["log_tail"]  # its threads' stacks: where the time went
    assert len(st["results"].get("runs", [])) <= 1
    assert json.loads((tmp_path / JSON_NAME).read_text())["stages"]["tests"]["status"] == "timed out"


def test_stages_that_do_not_fit_the_deadline_are_skipped(tmp_path):
    doc = run_check(str(tmp_path), deadline_s=5, stages=["preflight", "e2e"], dry_run=True)
    assert doc["stage_order"] == ["preflight", "e2e"]
    for name in ("preflight", "e2e"):
        assert doc["stages"][name]["status"] == "skipped" and "did not fit" in doc["stages"][name]["reason"]


def test_summary_renders_partial_and_malformed_results():
    doc = {"dry_run": False, "stage_order": ["preflight", "layer"], "started": "now", "deadline_s": 420,
           "stages": {"preflight": {"status": "running"}, "layer": {"status": "timed out", "results": {"items": [{"shape": 3}]}}}}
    md = summary_markdown(doc)
    assert "| preflight | running |" in md and "could not tabulate" in md


def test_cli_errors(capsys):
    if not torch.cuda.is_available():
        assert cli.main(["gpu-check", "--out", "unused"]) == 2
        assert "--dry-run" in capsys.readouterr().err
    assert cli.main(["gpu-check", "--dry-run", "--shapes", "64x32"]) == 2
    assert "MxKxN" in capsys.readouterr().err
    assert cli.main(["gpu-check", "--dry-run", "--deadline", "3"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["gpu-check", "--stages", "nosuchstage"])


def test_failures_are_logged_as_they_are_reported(tmp_path, monkeypatch):
    """The tests stage's pytest may be killed at its cap before its summary: with
    FQT_FAILURE_LOG set, each failure is in that file the moment it is reported."""
    from types import SimpleNamespace

    from tests.conftest import pytest_runtest_logreport

    log, outcomes = tmp_path / "failures.log", tmp_path / "outcomes.log"
    monkeypatch.setenv("FQT_FAILURE_LOG", str(log))
    monkeypatch.setenv("FQT_OUTCOME_LOG", str(outcomes))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # the controlling process writes

    def report(nodeid, outcome, duration, longrepr=None):
        return SimpleNamespace(failed=outcome == "failed", passed=outcome == "passed", outcome=outcome, nodeid=nodeid,
                               when="call", duration=duration, longrepr=longrepr)

    pytest_runtest_logreport(report("t.py::ok", "passed", 0.1))
    assert not log.exists()
    pytest_runtest_logreport(report("t.py::bad", "failed", 1.5, "E  boom"))
    text = log.read_text()
    assert "FAILED t.py::bad (call, 1.5 s)" in text and "E  boom" in text
    assert outcomes.read_text().splitlines() == ["PASSED t.py::ok (call, 0.1 s)", "FAILED t.py::bad (call, 1.5 s)"]
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")  # a worker's copy of the report: not written twice
    pytest_runtest_logreport(report("t.py::again", "failed", 0.2, "E  boom"))
    assert "again" not in log.read_text() + outcomes.read_text()
