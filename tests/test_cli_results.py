"""``fqt results``, end to end: a file of its own, so that the parallel test run (a file per
worker) can give it a worker while the other commands' tests run on another."""

from __future__ import annotations

import pytest

from fqt_compiler.tools import cli


@pytest.mark.slow  # trains both models under one recipe
def test_results_command_on_a_tiny_budget(tmp_path, capsys):
    # reference execution: the command's wiring, tables and plots, without compiling BHQ's
    # kernels-mode graphs with Inductor cold (7-8 minutes of a 2-core CI run; the kernels path
    # of both models is trained by the demo's and the fresh-process tests)
    assert cli.main(["results", "--steps", "3", "--epochs", "1", "--recipes", "bhq4", "--execution", "reference",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert rows == ["bhq4"]
    assert (tmp_path / "results_lm.png").exists() and (tmp_path / "results_cnn.png").exists()
