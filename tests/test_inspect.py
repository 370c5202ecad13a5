"""Inspection: golden decision tables, runnable stage files, the picture, FQT_DUMP_DIR and the
``fqt inspect`` command. Regenerate the goldens with FQT_UPDATE_GOLDEN=1 after a deliberate
change, and review the diff."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fqt_compiler as fqt
from fqt_compiler import dump
from fqt_compiler.tools import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "inspect_mlp.py"
GOLDEN = Path(__file__).parent / "golden"


def _example():
    model, inputs = cli.load_factory(f"{EXAMPLE}:make")
    return model, inputs


@pytest.mark.parametrize("recipe", ["int8", "bhq5"])
def test_explain_text_matches_golden(recipe):
    model, inputs = _example()
    text = str(fqt.explain(model, *inputs, recipe=recipe, execution="reference")) + "\n"
    golden = GOLDEN / f"explain_mlp_{recipe}.txt"
    if os.environ.get("FQT_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()
    # stable: a second compile in the same process prints the same text
    assert str(fqt.explain(model, *inputs, recipe=recipe, execution="reference")) + "\n" == text


@pytest.mark.slow  # about 10 s: every dumped stage runs as a script
def test_report_stage_files_run(tmp_path):
    model, inputs = _example()
    report = fqt.explain(model, *inputs, recipe="psq8", execution="kernels", inductor=False)
    report.write(tmp_path)
    files = sorted((tmp_path / "graph0").glob("*.py"))
    stages = [f.stem.split("_", 1)[1] for f in files]
    assert stages == ["input", "find_sites", "select_specs", "insert_qdq", "dedupe", "forward", "backward"]
    # one fresh interpreter runs each file as a script (one per file paid torch's import 7 times)
    driver = ("import runpy, sys\nfor f in sys.argv[1:]:\n"
              "    print('==', f, flush=True)\n    runpy.run_path(f, run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", driver, *map(str, files)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout[-500:], run.stderr[-2000:])
    outputs = run.stdout.split("== ")[1:]
    assert [o.split("\n", 1)[0] for o in outputs] == [str(f) for f in files]
    assert all(o.split("\n", 1)[1].startswith("ok:") for o in outputs), run.stdout[-2000:]
    # the lowered backward graph calls the int8 GEMM and the BHQ-free psq quantizers
    assert "fqt.qmm" in (tmp_path / "graph0" / "06_backward.txt").read_text()


def test_picture_distinguishes_quantize_nodes_and_gemm_kinds(tmp_path, monkeypatch):
    model, inputs = _example()
    report = fqt.explain(model, *inputs, recipe="bhq5", execution="reference")
    dot = report.records[0].dot
    for color in ("#4c78a8", "#54a24b", "#e45756", "#f58518", "#eeca3b", "#ff9da6"):  # 3 GEMM kinds, q, dq, T^-1
        assert color in dot
    monkeypatch.setattr(dump.shutil, "which", lambda name: None)
    notes = report.write(tmp_path)
    assert (tmp_path / "graph0" / "joint.dot").exists()
    assert any("dot -Tsvg joint.dot -o joint.svg" in n for n in notes)


def test_fqt_dump_dir_writes_every_compiled_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("FQT_DUMP_DIR", str(tmp_path))
    model, inputs = _example()
    compiled = torch.compile(model, backend=fqt.backend(recipe="int8", execution="reference"))
    compiled(*inputs).sum().backward()
    assert "grad_weight" in (tmp_path / "report.txt").read_text()
    names = {f.name for f in (tmp_path / "graph0").iterdir()}
    assert {"04_dedupe.py", "05_forward.py", "06_backward.py", "joint.dot"} <= names


def test_inspect_command_on_the_example(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["inspect", f"{EXAMPLE}:make", "--recipe", "bhq5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lowbit-kernel" in printed and "grad_input" in printed
    assert (out / "report.txt").exists() and (out / "graph0" / "joint.dot").exists()
    assert len(list((out / "graph0").glob("*.py"))) == 7


@pytest.mark.parametrize("spec,message", [
    ("no_colon.py", "path/to/script.py:function"),
    ("missing.py:make", "no such file"),
    (f"{EXAMPLE}:nope", "no function 'nope'"),
])
def test_inspect_rejects_bad_factories(spec, message, capsys):
    assert cli.main(["inspect", spec]) == 2
    assert message in capsys.readouterr().err


def test_dumped_text_has_no_machine_paths(tmp_path):
    model, inputs = _example()
    fqt.explain(model, *inputs, recipe="int8", execution="reference").write(tmp_path)
    for f in (tmp_path / "graph0").glob("*.txt"):
        text = f.read_text()
        assert str(EXAMPLE.parent) not in text and "0x7f" not in text, f.name


def test_per_pass_log_on_the_fqt_compiler_logger(caplog):
    model, inputs = _example()
    with caplog.at_level("DEBUG", logger="fqt_compiler"):
        fqt.explain(model, *inputs, recipe="int8", execution="reference")
    passes_logged = [r.getMessage() for r in caplog.records if r.name == "fqt_compiler.passes"]
    for name in ("find_sites", "select_specs", "insert_qdq", "dedupe"):
        assert any(f"pass {name} done" in msg for msg in passes_logged), name
    assert any("GEMM sites" in r.getMessage() for r in caplog.records if r.name == "fqt_compiler")


def test_fqt_log_environment_knob():
    env = dict(os.environ, FQT_LOG="debug")
    code = "import torch, fqt_compiler as fqt; fqt.explain(torch.nn.Linear(4, 3), torch.randn(2, 4), execution='reference')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and "[fqt_compiler.passes] pass insert_qdq done" in run.stderr


@pytest.mark.interpreter
def test_inspect_shows_the_generated_fused_kernels(tmp_path, capsys):
    """Under Triton's interpreter (set by the test suite) ``--fusion triton`` generates the
    fused kernels on CPU: the report lists them and writes their sources."""
    out = tmp_path / "report"
    assert cli.main(["inspect", f"{EXAMPLE}:make", "--recipe", "int8", "--fusion", "triton", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "generated fused kernels" in printed and "prologue (quantize)" in printed and "gelu" in printed
    sources = list(out.glob("graph*/kernels/fused*"))
    assert sources and any("Generated by fqt" in p.read_text() for p in sources)


def test_inspect_never_slower_marks_tiny_sites(capsys, tmp_path):
    assert cli.main(["inspect", f"{EXAMPLE}:make", "--never-slower", "--out", str(tmp_path / "r")]) == 0
    assert "cost model" in capsys.readouterr().out  # a 10x16x32 GEMM cannot win on any profile


def test_explain_takes_keyword_inputs_and_reports_progress(capsys):
    """Hugging Face models are called as model(**batch): explain(model, kwargs=batch). Without
    Inductor by default (as fqt inspect), with a line on stderr per compile step."""

    class KwModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 4)

        def forward(self, input_ids=None, scale=1.0):
            return self.proj(input_ids) * scale

    report = fqt.explain(KwModel(), kwargs={"input_ids": torch.randn(3, 8), "scale": 2.0}, recipe="int8")
    assert report.counts()["lowbit-kernel"] == 2  # output and grad_weight (the input needs no grad)
    assert all(not k.startswith("inductor:") for k in report.kernel_sources())  # Inductor off by default
    err = capsys.readouterr().err
    assert "fqt explain" in err and "explaining KwModel (recipe int8" in err and "forward compiled" in err
    assert "backward compiled" in err
    fqt.explain(KwModel(), torch.randn(3, 8), progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(fqt.FQTError, match="kwargs must be a dict"):
        fqt.explain(KwModel(), kwargs=[1])


class _Outlier(torch.nn.Module):
    """Two Linears; the second one's input has one feature 1e4 times the others (with a weight
    that cancels it): under per-token int8 scales that feature sets the scale and the rest of
    the row, which makes the output, rounds to zero."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        self.register_buffer("gain", torch.ones(16))
        self.gain[3] = 1e4
        with torch.no_grad():
            self.second.weight[:, 3] *= 1e-4

    def forward(self, x):
        return self.second(self.first(x) * self.gain)


def test_forward_error_column_singles_out_the_bad_site():
    torch.manual_seed(0)
    report = fqt.explain(_Outlier(), torch.randn(8, 16), recipe="int8", progress=False)
    errors = {s.module_path: report.forward_errors[(s.graph_id, s.site_id)] for s in report.sites}
    assert errors["first"] < 0.02 and errors["second"] > 10 * errors["first"], errors
    table = report.table()
    assert "fwd err" in table.splitlines()[0]
    assert fqt.explain(_Outlier(), torch.randn(8, 16), progress=False, forward_error=False).forward_errors == {}


def test_default_tables_fit_120_columns_with_a_summary():
    """A long model (long module paths, long reasons): the default report fits 120 columns and
    opens with a per-op summary; the wide view keeps every column."""

    class Deep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder_with_a_long_name = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(6))
            self.attention_projection_head = torch.nn.Bilinear(8, 8, 8)

        def forward(self, x):
            for layer in self.encoder_with_a_long_name:
                x = torch.relu(layer(x))
            return self.attention_projection_head(x, x)

    with pytest.warns(fqt.CoverageWarning):
        report = fqt.explain(Deep(), torch.randn(4, 8), recipe="bhq8", progress=False)
    text = str(report)
    assert max(len(line) for line in text.splitlines()) <= 120, max(text.splitlines(), key=len)
    assert "on low-bit kernels" in text.splitlines()[3] or "on low-bit kernels" in text  # the per-op summary
    assert "addmm" in report.summary() and "_trilinear" in report.summary()
    wide = report.render(wide=True)
    assert "operands" in wide and "bhq" in wide and max(len(line) for line in wide.splitlines()) > 120


def test_backward_gemms_read_pending_until_the_first_backward_compiles_them():
    """AOTAutograd compiles the backward graph at the first backward call: until then its
    GEMMs say so in the records, instead of a bare 'simulated' that the lowering later
    contradicts."""
    from fqt_compiler.records import PENDING

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    be = fqt.backend(recipe="int8", inductor=False)  # the lowering runs without Inductor too
    out = torch.compile(model, backend=be)(torch.randn(3, 8))

    def by_kind():
        return {(s.module_path, g.kind.value): g for r in be.records for s in r.decisions for g in s.gemms}

    before = by_kind()
    assert before[("0", "output")].status is fqt.GemmStatus.LOWBIT_KERNEL
    pending = [k for k, g in before.items() if g.reason == PENDING]
    assert sorted(pending) == [("0", "grad_weight"), ("2", "grad_input"), ("2", "grad_weight")]
    assert all("pending" in before[k].label for k in pending)
    out.sum().backward()
    after = by_kind()
    assert all(after[k].status is fqt.GemmStatus.LOWBIT_KERNEL and after[k].reason != PENDING for k in pending)
