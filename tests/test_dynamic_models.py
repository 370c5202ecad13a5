"""Models whose sizes change under fqt with Inductor: a monitored dynamic graph and a language
model on sequences of several lengths (a file of their own: each compiles dynamic graphs with
Inductor, minutes with cold caches, which the parallel test run balances by file)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fqt_compiler as fqt

pytestmark = pytest.mark.slow


def test_a_monitored_dynamic_graph_fuses_its_probes_without_specializing():
    """The monitor's probes are traced into a dynamic-shape graph too, and they put no guard on
    the symbolic batch: batch sizes on both sides of Inductor's float32-sum threshold (a
    512-wide output at batches 7 and 12) and of the probes' row sampling still share one
    dynamic graph."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 512))
    mon = fqt.Monitor(every=1, warn=False)
    be = fqt.backend(recipe="int8", monitor=mon)
    step = torch.compile(model, backend=be)
    for batch in (16, 12, 5, 20, 7):
        step(torch.randn(batch, 16)).square().mean().backward()
    assert len(be.records) == 2  # the static graph, then one dynamic graph for every later batch
    calls = [name for launch in be.records[-1].launches for name, _ in launch.python_calls]
    assert calls == []
    assert len(mon.records) >= 5 and all(
        math.isfinite(v) for r in mon.records for k, v in r.items() if isinstance(v, float) and k != "step")


def test_a_transformer_with_a_varying_sequence_length_keeps_fused_quantizers():
    """A language model stepped on sequences of several lengths: after the second length one
    dynamic graph serves them all, its GEMMs decided as in the static graph, its quantizers
    (the Linears' and the attention matmuls') fused, its losses finite."""
    from tests.helpers.models import GPTBlock

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = GPTBlock(block=16)
    be = fqt.backend(recipe="int8")
    step = torch.compile(model, backend=be)
    for length in (6, 10, 13, 7):  # not 16: slicing the whole mask is a guard of the model's own
        idx = torch.randint(0, 16, (2, length))
        out = step(idx)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), idx.reshape(-1))
        loss.backward()
        assert torch.isfinite(loss)
    assert len(be.records) == 2  # the static graph, then one dynamic graph for every later length
    static, dynamic = be.records
    assert any("s" in g.shape for s in dynamic.decisions for g in s.gemms)
    statuses = lambda r: [(g.kind, g.status) for s in r.decisions for g in s.gemms]  # noqa: E731
    assert statuses(dynamic) == statuses(static)
    assert [name for launch in dynamic.launches for name, _ in launch.python_calls] == []
