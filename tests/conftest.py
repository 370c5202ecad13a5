"""Shared test set-up: fixed seeds, a fresh Dynamo per test, the ``gpu`` and ``interpreter``
markers, and the test tiers: ``--tier fast`` (the default: every test not marked ``slow``),
``--tier slow`` and ``--tier all`` (CI).

Triton kernels need a GPU or Triton's interpreter. Without CUDA the interpreter runs them on
CPU tensors (chosen when a kernel is decorated, so set before any ``fqt_compiler.codegen.kernels`` import).
With CUDA, the kernel tests run the compiled kernels on CUDA tensors (``tests.helpers.device``); tests that
feed Triton CPU tensors are marked ``interpreter`` and skip there, with the reason.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Cost-model profiles and GEMM-provider timings measured on this machine (`fqt calibrate`, `fqt
# gpu-check`, a GPU's provider measurements) would change decisions from one machine to the next:
# the tests (and the processes they start) read and write only a fresh folder of their own.
os.environ["FQT_PROFILE_DIR"] = tempfile.mkdtemp(prefix="fqt_test_profiles_")
atexit.register(shutil.rmtree, os.environ["FQT_PROFILE_DIR"], ignore_errors=True)

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per worker process (``pytest -n N``, N workers on N cores): OpenMP
    # threads of several processes spinning on shared cores slow every op down by 10-50x. The
    # variable reaches the processes tests start.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # Inductor's C++ compiles in the worker itself: with a worker per core, its default pool of
    # compile processes (each importing torch) only adds start-up time and contention
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(autouse=True)
def _fresh_state():
    # traces cached by an earlier test would hide a function a test replaces (monkeypatch)
    from fqt_compiler.codegen.inline import REFERENCE_TRACES

    torch.manual_seed(0)
    torch._dynamo.reset()
    REFERENCE_TRACES.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy machine (two
    spinning OpenMP threads on two shared cores slow every step down by 10-50x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TIERS = ("fast", "slow", "all")


def pytest_addoption(parser):
    parser.addoption(
        "--tier", choices=TIERS, default="fast",
        help="fast (default): every test not marked slow; slow: only those; all: both (what CI runs)",
    )


def pytest_configure(config):
    if INTERPRETER:
        from tests.helpers.interpreter import interpreter_problem

        problem = interpreter_problem()
        if problem:
            raise pytest.UsageError(problem)


def pytest_collection_modifyitems(config, items):
    _select_tier(config, items)
    _longest_first(items)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        marker = "gpu"
    elif not INTERPRETER:
        skip = pytest.mark.skip(reason="feeds Triton kernels CPU tensors, which needs Triton's interpreter (TRITON_INTERPRET=1); "
                                       "on this CUDA machine the kernels run compiled, on CUDA tensors, in the kernel tests")
        marker = "interpreter"
    else:
        return
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


def _select_tier(config, items) -> None:
    """Keep the tests of the ``--tier`` asked for; the others are reported as deselected."""
    tier = config.getoption("--tier")
    if tier == "all":
        return
    keep, drop = [], []
    for item in items:
        (keep if ("slow" in item.keywords) == (tier == "slow") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _longest_first(items) -> None:
    """The files holding slow tests first, each file's tests in their order. The parallel run
    (``-n auto --dist loadfile --no-loadscope-reorder``, the README's) hands whole files to its
    workers in this order, so the files of minutes-long tests start first and the run does
    not end with one worker on such a file while the other idles; a file stays on one
    worker, so its module-scoped fixtures run once."""
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)


def pytest_report_header(config):
    tier = config.getoption("--tier")
    if tier != "all":
        return f"test tier: {tier} (--tier all runs every test, as CI does)"
    return "test tier: all"


def pytest_runtest_logreport(report):
    """With ``FQT_FAILURE_LOG`` set (``fqt gpu-check``'s tests stage), every failure is appended
    to that file the moment it is reported: a run killed at its time cap never prints its
    summary, and a GPU's minutes are too few to run it again to see what failed. With
    ``FQT_OUTCOME_LOG``, every test's outcome gets a line there too (which passed before the
    cap). Written by the controlling process only: under xdist it also receives every
    worker's reports."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    outcomes = os.environ.get("FQT_OUTCOME_LOG")
    if outcomes and (report.when == "call" or not report.passed):
        with open(outcomes, "a") as log:
            log.write(f"{report.outcome.upper()} {report.nodeid} ({report.when}, {report.duration:.1f} s)\n")
    path = os.environ.get("FQT_FAILURE_LOG")
    if not path or not report.failed:
        return
    with open(path, "a") as log:
        log.write(f"FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{str(report.longrepr)[-4000:]}\n\n")
