"""Inductor's on-disk FX graph cache never hands one fqt configuration another's code: its key
carries fqt's config identity, the registered quantizers and a hash of fqt's source. Two
recipes compiled one after another, in one process and in processes sharing a cache directory,
each get their own compiled graphs (and their own numbers); a rule that leaves the graph
unchanged still keys its own entry; a changed fqt misses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_SCRIPT = r'''
import json, sys, torch, fqt_compiler as fqt
from torch import nn
from torch._dynamo.utils import counters
import fqt_compiler.codegen.cache_key as ck

def run(recipe, rules=()):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    before = dict(counters["inductor"])
    torch.manual_seed(1)
    loss = torch.compile(model, backend=fqt.backend(recipe=recipe, rules=list(rules)))(x).square().mean()
    loss.backward()
    c = counters["inductor"]
    return [loss.item(), c["fxgraph_cache_hit"] - before.get("fxgraph_cache_hit", 0),
            c["fxgraph_cache_miss"] - before.get("fxgraph_cache_miss", 0)]

inert = [fqt.Rule("inert", module="no.such.module", high_precision="matches nothing")]
cases = (("int8", ("int8",)), ("psq8", ("psq8",)), ("int8 again", ("int8",)), ("inert rule", ("int8", inert)))
out = {name: run(*args) for name, args in cases}
if sys.argv[1] == "then-changed":  # then another fqt (another source hash), in the same process
    ck.source_hash = lambda: "another fqt"
    out.update({f"changed {name}": run(*args) for name, args in cases[:2]})
print(json.dumps(out))
'''


def _run(cache_dir, mode="same"):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_each_configuration_gets_its_own_cached_code(tmp_path):
    first = _run(tmp_path)
    # one process: every new configuration misses (forward + backward graph), a repeat hits
    assert [first[k][1:] for k in ("int8", "psq8", "int8 again", "inert rule")] == [[0, 2], [0, 2], [2, 0], [0, 2]]
    assert first["int8"][0] != first["psq8"][0] and first["int8 again"][0] == first["int8"][0]
    # a second process on the same cache: every configuration hits its own entries, same numbers
    second = _run(tmp_path, "then-changed")
    assert all(second[k][1:] == [2, 0] for k in first), second
    assert all(second[k][0] == first[k][0] for k in first)
    # another fqt (its source hash) never reuses them
    assert [second[f"changed {k}"][1:] for k in ("int8", "psq8")] == [[0, 2], [0, 2]]
