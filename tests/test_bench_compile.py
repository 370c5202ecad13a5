"""``fqt bench --sections compile``: cold first-step compile times, each backend in a fresh process."""

from __future__ import annotations

import pytest
import torch

from fqt_compiler.tools import bench_compile


@pytest.mark.slow
def test_first_step_compiles_in_a_fresh_process_with_empty_caches():
    times = bench_compile.first_step_times("inductor", torch.device("cpu"), width=16, layers=1)
    assert set(times) == {"forward", "backward", "dynamic"}
    assert all(t > 0 for t in times.values())


def test_a_failing_run_reports_its_error():
    with pytest.raises(RuntimeError, match="no-such-recipe"):
        bench_compile.first_step_times("no-such-recipe", torch.device("cpu"), width=16, layers=1)


def test_the_section_compares_every_backend_with_inductor(monkeypatch):
    seconds = {"inductor": (2.0, 1.0, 5.0), "int8": (4.0, 2.0, 9.0), "psq8": (3.0, 3.0, 7.0)}
    monkeypatch.setattr(bench_compile, "first_step_times",
                        lambda backend, device: dict(zip(("forward", "backward", "dynamic"), seconds[backend])))
    text = "\n".join(bench_compile.compile_section([], ["int8", "psq8"], torch.device("cpu"), 1, torch.float32))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "backend" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["inductor", "fqt int8", "fqt psq8"]
    assert [r.split("|")[5].strip() for r in rows] == ["1.00x", "2.00x", "2.00x"]
    assert [float(r.split("|")[6]) for r in rows] == [5.0, 9.0, 7.0]
