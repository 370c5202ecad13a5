"""``fqt bench --sections conv``, end to end: a file of its own, so that the parallel test run (a file per
worker) can give it a worker while the other commands' tests run on another."""

from __future__ import annotations

import pytest

from fqt_compiler.tools import cli


@pytest.mark.slow  # about a minute with cold compile caches: a PreAct-ResNet-8 under fqt and three baselines
def test_bench_conv_section_times_layers_and_networks(tmp_path, monkeypatch):
    """``--sections conv``: a convolution layer and a CIFAR network's training step against
    fp32 (both layouts) and bf16 autocast channels-last, with the low-bit GEMMs counted."""
    from fqt_compiler.tools import bench_conv

    monkeypatch.setattr(bench_conv, "CONV_LAYERS", [(2, 8, 8, 8, 3, 1)])
    monkeypatch.setattr(bench_conv, "NETWORKS", [("preact8", 4)])
    monkeypatch.setattr(bench_conv, "cpu_bf16_units", lambda: True)
    out_file = tmp_path / "bench.md"
    assert cli.main(["bench", "--sections", "conv", "--recipes", "int8", "--reps", "1", "--device", "cpu",
                     "--output", str(out_file)]) == 0
    text = out_file.read_text()
    assert "vs fp32 channels-last" in text and "vs bf16 channels-last" in text
    rows = [line for line in text.splitlines() if line.startswith("| 8->8") or line.startswith("| preact8")]
    assert len(rows) == 2
    # every convolution GEMM and the classifier's run on low-bit kernels (the layer: 3 of 3)
    assert rows[0].split("|")[-2].strip() == "3/3"
    lowbit, total = rows[1].split("|")[-2].strip().split("/")
    assert lowbit == total and int(total) > 20


def test_networks_by_name():
    from fqt_compiler.tools.cnn_models import PreActResNet, cnn

    assert isinstance(cnn("preact8"), PreActResNet) and isinstance(cnn("preact32"), PreActResNet)
    with pytest.raises(ValueError, match="6n"):
        cnn("preact21")
    with pytest.raises(ValueError, match="preact<depth>"):
        cnn("vgg16")
