"""The examples: PreAct-ResNet-20 (the paper's CIFAR family) trains under fqt, every conv and
the classifier found, no graph break."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fqt_compiler as fqt
from examples.preact_resnet import preact_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("recipe", ["int8", "bhq5"])
def test_preact_resnet20_trains(recipe):
    torch.manual_seed(0)
    model = preact_resnet(20)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    counters.clear()
    be = fqt.backend(recipe=recipe, execution="reference")
    compiled = torch.compile(model, backend=be)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert sum(counters["graph_break"].values()) == 0
    sites = [s for r in be.records for s in r.decisions]
    # 19 convs (stem, 18 in blocks) + 2 shortcut 1x1 convs + the classifier
    assert sum(s.op == "aten.convolution" for s in sites) == 21 and sum(s.op == "aten.addmm" for s in sites) == 1
    assert all(g.status is fqt.GemmStatus.SIMULATED for s in sites for g in s.gemms)


def test_preact_resnet_depth_is_validated():
    with pytest.raises(ValueError, match="6n"):
        preact_resnet(21)


def test_monitor_example_singles_out_the_bad_layer(tmp_path):
    """examples/monitor_digits.py (docs/monitor.md's worked example), shortened."""
    pytest.importorskip("sklearn")
    from examples.monitor_digits import BAD, train
    from fqt_compiler.tools.monitor_log import render

    torch._dynamo.reset()
    log = tmp_path / "m.jsonl"
    mon, losses = train(str(log), "grad", policy=True, steps=30, execution="reference")
    assert {a["module"] for a in mon.alerts} == {BAD}
    assert [r["module"] for r in mon.records if r["kind"] == "policy"] == [BAD]
    assert "(policy: fixed)" in render(str(log))
