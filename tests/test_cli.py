"""The ``fqt`` command line: demo and bench run end to end; user errors exit cleanly."""

from __future__ import annotations

import pytest

from tools import cli


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
    assert cli.main(["bench", "--sections", "gemm", "--shapes", "64x32x48", "--reps", "1", "--device", "cpu", "--output", str(out_file)]) == 0
    text = out_file.read_text()
    assert "64x32x48" in text and "vs hp GEMM" in text and "device:" in text


def test_bench_rejects_a_malformed_shape():
    with pytest.raises(ValueError):
        cli.main(["bench", "--sections", "gemm", "--shapes", "64x32", "--device", "cpu"])


def test_results_command_on_a_tiny_budget(tmp_path, capsys):
    assert cli.main(["results", "--steps", "3", "--epochs", "1", "--recipes", "exact", "bhq4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert rows == ["exact", "bhq4"]
    assert (tmp_path / "results_lm.png").exists()
