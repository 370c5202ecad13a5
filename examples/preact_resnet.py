"""PreAct-ResNet-20 for CIFAR-10 (He et al., "Identity Mappings in Deep Residual Networks"),
the family the paper's CIFAR experiments use (PreAct-ResNet-56 there: ``preact_resnet(depth=56)``).
The network itself lives in ``fqt_compiler.tools.cnn_models``, which the benchmarks time.

    import torch, fqt_compiler as fqt
    from examples.preact_resnet import preact_resnet
    model = torch.compile(preact_resnet(20), backend="fqt", options={"recipe": "bhq5"})
"""

from __future__ import annotations

import torch

from fqt_compiler.tools.cnn_models import PreActBlock, PreActResNet, preact_resnet

__all__ = ["PreActBlock", "PreActResNet", "preact_resnet", "make"]


def make():
    """Factory for ``fqt inspect examples/preact_resnet.py:make``."""
    torch.manual_seed(0)
    return preact_resnet(20), (torch.randn(2, 3, 32, 32),)
