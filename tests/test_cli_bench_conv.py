"""``fqt bench --sections conv``, end to end: a file of its own, so that the parallel test run (a file per
worker) can give it a worker while the other commands' tests run on another."""

from __future__ import annotations

import pytest
from torch import nn

from fqt_compiler.tools import cli


def _two_conv_net() -> nn.Module:
    # the section's code path with the fewest compiled kernels: each of its four compiles (fqt and
    # three baselines) of a PreAct-ResNet-8 took most of a minute with cold caches
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.slow  # about a minute with cold compile caches: a conv layer and a 2-conv network under fqt and three baselines
def test_bench_conv_section_times_layers_and_networks(tmp_path, monkeypatch):
    """``--sections conv``: a convolution layer and a CIFAR network's training step against
    fp32 (both layouts) and bf16 autocast channels-last, with the low-bit GEMMs counted."""
    from fqt_compiler.tools import bench_conv

    monkeypatch.setattr(bench_conv, "CONV_LAYERS", [(2, 8, 8, 8, 3, 1)])
    monkeypatch.setattr(bench_conv, "NETWORKS", [("net2", 4)])
    monkeypatch.setattr(bench_conv, "cnn", lambda name: _two_conv_net())
    monkeypatch.setattr(bench_conv, "cpu_bf16_units", lambda: True)
    out_file = tmp_path / "bench.md"
    assert cli.main(["bench", "--sections", "conv", "--recipes", "int8", "--reps", "1", "--device", "cpu",
                     "--output", str(out_file)]) == 0
    text = out_file.read_text()
    assert "vs fp32 channels-last" in text and "vs bf16 channels-last" in text
    rows = [line for line in text.splitlines() if line.startswith("| 8->8") or line.startswith("| net2")]
    assert len(rows) == 2
    # every convolution GEMM and the classifier's run on low-bit kernels (the layer: 3 of 3; the
    # network: 2 convolutions and a Linear, but the first convolution's input needs no gradient)
    assert rows[0].split("|")[-2].strip() == "3/3"
    assert rows[1].split("|")[-2].strip() == "8/8"


def test_networks_by_name():
    from fqt_compiler.tools.cnn_models import PreActResNet, cnn

    assert isinstance(cnn("preact8"), PreActResNet) and isinstance(cnn("preact32"), PreActResNet)
    with pytest.raises(ValueError, match="6n"):
        cnn("preact21")
    with pytest.raises(ValueError, match="preact<depth>"):
        cnn("vgg16")
