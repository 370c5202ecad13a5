"""The ``fqt`` command line: demo and bench run end to end; user errors exit cleanly."""

from __future__ import annotations

import pytest

from fqt_compiler.tools import cli
from tests.helpers import variance_factory


def test_demo_runs_and_prints_one_row_per_recipe(capsys):
    assert cli.main(["demo", "--recipes", "exact", "bhq4", "--epochs", "1", "--var-draws", "3"]) == 0
    out = capsys.readouterr().out
    assert "simulated" in out  # the demo says what it measures
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["exact", "bhq4"]


def test_demo_rejects_an_unknown_recipe_before_training(capsys):
    assert cli.main(["demo", "--recipes", "psq3"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'psq3'" in err and "psq4" in err


def test_bench_gemm_section_reports_ratios(capsys, tmp_path):
    out_file = tmp_path / "bench.md"
    assert cli.main(
        ["bench", "--sections", "gemm", "--shapes", "64x32x48", "--reps", "1", "--device", "cpu", "--output", str(out_file)]
    ) == 0
    text = out_file.read_text()
    assert "64x32x48" in text and "vs hp GEMM" in text and "device:" in text


def test_bench_rejects_a_malformed_shape():
    with pytest.raises(ValueError):
        cli.main(["bench", "--sections", "gemm", "--shapes", "64x32", "--device", "cpu"])


_VARIANCE_FACTORY = variance_factory.SOURCE


def test_variance_command_on_a_user_factory(tmp_path, capsys):
    script = tmp_path / "model.py"
    script.write_text(_VARIANCE_FACTORY)
    assert cli.main(["variance", f"{script}:make", "--recipe", "bhq4", "--draws", "8", "--no-sweep"]) == 0
    out = capsys.readouterr().out
    assert "recipe bhq4" in out and "bit-width advice" in out
    assert [line.split("|")[1].strip() for line in out.splitlines()
            if line.startswith("| ") and "layer" not in line][:2] == ["0", "2"]
    assert cli.main(["variance", f"{script}:wrong"]) == 2
    assert "(model, loss_fn, batches)" in capsys.readouterr().err


@pytest.mark.slow  # about 20 s: three tiny layers compiled per CPU kind
@pytest.mark.parametrize("bf16_units", [True, False])
def test_bench_layer_section_times_bf16_autocast_where_the_cpu_has_it(capsys, tmp_path, monkeypatch, bf16_units):
    """The layer section reports each candidate's range beside its median, and a bf16-autocast
    baseline on CPUs with bf16 units; elsewhere it says there is none."""
    from fqt_compiler.tools import bench

    monkeypatch.setattr(bench, "cpu_bf16_units", lambda: bf16_units)
    out_file = tmp_path / "bench.md"
    assert cli.main(["bench", "--sections", "layer", "--shapes", "64x32x48", "--reps", "2", "--device", "cpu",
                     "--output", str(out_file)]) == 0
    text = out_file.read_text()
    assert "range vs fp32" in text and "64x32->48" in text
    assert ("vs bf16 autocast" in text) is bf16_units
    assert ("no bf16 units" in text) is not bf16_units


@pytest.mark.slow  # about 30 s: two compiles of an attention step
def test_bench_attention_section_times_the_batched_gemms(tmp_path, monkeypatch):
    """The attention section times the attention core per recipe against fp32 and counts the
    GEMMs that ran low-bit: all six. (Its bf16-autocast column is the layer section's, tested
    there.)"""
    from fqt_compiler.tools import bench_attention

    monkeypatch.setattr(bench_attention, "CPU_SHAPES", [(2, 2, 16, 8)])
    monkeypatch.setattr(bench_attention, "cpu_bf16_units", lambda: False)
    out_file = tmp_path / "bench.md"
    assert cli.main(["bench", "--sections", "attention", "--recipes", "int8", "--reps", "2", "--device", "cpu",
                     "--output", str(out_file)]) == 0
    text = out_file.read_text()
    assert "Attention core fwd+bwd" in text and "vs fp32" in text
    row = next(line for line in text.splitlines() if line.startswith("| 2x2x16x8"))
    assert row.split("|")[-2].strip() == "6", row


@pytest.mark.slow  # about 10 s: a fresh process under Triton's interpreter
def test_host_overhead_tool_times_every_op_with_launches_mocked():
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fqt_compiler.tools.host_overhead", "--reps", "3"],
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if "(2048x768" in line]
    assert len(rows) == 5 and all(float(r.split()[-1]) > 0 for r in rows)
