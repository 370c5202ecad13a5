"""The package's structure: one import namespace, an acyclic import graph with the numerical
core at the bottom, every transformation in the one pipeline table, and a clean lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import networkx as nx
import pytest

from tests.helpers.import_graph import import_graph

ROOT = Path(__file__).resolve().parents[1]
# the numerical core: what every other layer builds on, and what must build on nothing above it
CORE = ("specs", "errors", "layout", "grid", "reference", "bhq", "quantizers", "sites", "records")


def test_import_graph_has_no_cycles():
    graph = import_graph()
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", CORE)
def test_core_never_imports_passes_codegen_or_tools(module):
    graph = import_graph()
    reached = nx.descendants(graph, f"fqt_compiler.{module}")
    upper = sorted(m for m in reached if m.startswith(("fqt_compiler.passes", "fqt_compiler.codegen", "fqt_compiler.tools")))
    assert not upper, f"fqt_compiler.{module} reaches {upper}"


def test_passes_never_import_codegen_or_tools():
    """The passes sit below codegen: none imports it; the only way from a pass to codegen is an
    op body's deferred import of its Triton kernel module (``fqt_compiler.ops``)."""
    graph = import_graph()
    for module in (m for m in graph if m.startswith("fqt_compiler.passes")):
        direct = sorted(m for m in graph.successors(module) if m.startswith(("fqt_compiler.codegen", "fqt_compiler.tools")))
        assert not direct, f"{module} imports {direct}"
        reached = nx.descendants(graph, module)
        upper = sorted(m for m in reached if m.startswith("fqt_compiler.tools")
                       or m.startswith("fqt_compiler.codegen") and not m.startswith("fqt_compiler.codegen.kernels"))
        assert not upper, f"{module} reaches {upper}"


def test_every_fqt_op_is_declared_in_one_module():
    """Every ``fqt::`` custom op is declared by ``fqt_compiler/ops.py``."""
    import fqt_compiler  # noqa: F401  (registers every op)

    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "tests" in path.parts or path.name == "ops.py" and path.parent.name == "fqt_compiler":
            continue
        assert 'custom_op("fqt::' not in path.read_text(), f"{path.relative_to(ROOT)} declares an fqt:: op"
    text = (ROOT / "fqt_compiler" / "ops.py").read_text()
    for name in ("quantize", "quantize_stochastic", "fake_quantize", "bhq_quantize", "bhq_inverse", "qmm", "quantize_kernel",
                 "bhq_quantize_kernel", "bhq_inverse_kernel", "fake_quantize_kernel", "fused_quantize", "qmm_epilogue",
                 "qmm_epilogue_stats", "qconv", "conv_codes", "monitor_codes", "monitor_fake", "monitor_error",
                 "monitor_gradient", "qbmm"):
        assert f'custom_op("fqt::{name}"' in text, name


def test_backend_holds_no_pass_wiring():
    """The backend wires AOTAutograd to the pipeline; every transformation is a pipeline step."""
    from fqt_compiler import pipeline

    source = (ROOT / "fqt_compiler" / "backend.py").read_text()
    for step in pipeline.STEPS:
        assert f"{step.name}(" not in source, f"backend.py calls the step {step.name} itself"
    names = [s.name for s in pipeline.STEPS]
    assert len(names) == len(set(names)) >= 16
    for i, step in enumerate(pipeline.STEPS):  # what a step requires runs before it
        assert all(r in names[:i] for r in step.requires), (step.name, step.requires)


def test_ruff_passes():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]' pins it")
    run = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.slow
def test_wheel_installs_one_top_level_package(tmp_path):
    """A wheel of the project holds ``fqt_compiler`` (with passes, codegen and tools inside it)
    and nothing else at the top level: no ``tools``, ``codegen`` or ``passes`` in site-packages."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith("fqt_compiler-")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"fqt_compiler"}, top
    for sub in ("passes/find_sites.py", "codegen/kernels/common.py", "tools/cli.py", "pipeline.py"):
        assert f"fqt_compiler/{sub}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fqt = fqt_compiler.tools.cli:main" in text and "fqt = fqt_compiler.backend:fqt_backend" in text


@pytest.mark.parametrize("tier,expected", [("slow", {"test_wheel_installs_one_top_level_package"}), ("fast", None)])
def test_tiers_select_the_slow_tests_or_the_others(tier, expected):
    """``--tier slow`` collects exactly the tests marked slow; ``--tier fast`` (the default) none of them."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--tier", tier,
         "tests/test_structure.py"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    names = {line.split("::")[-1].split("[")[0] for line in run.stdout.splitlines() if "::" in line}
    if expected is not None:
        assert names == expected
    else:
        assert names and "test_wheel_installs_one_top_level_package" not in names
