"""The convolutional networks of the paper's CIFAR experiments and their common baseline, as
the benchmarks and examples build them: PreAct-ResNet-20/56 (He et al., "Identity Mappings in
Deep Residual Networks"; the paper trains PreAct-ResNet-56) and the CIFAR-style ResNet-18
(3x3 stem, no max-pool, four stages of two basic blocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PreActBlock", "PreActResNet", "preact_resnet", "BasicBlock", "ResNet18", "resnet18_cifar", "Bottleneck", "ResNet50",
    "resnet50", "cnn",
]


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"PreAct-ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        blocks, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(PreActBlock(c, c_out, 2 if stage and i == 0 else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv(x))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def preact_resnet(depth: int = 20, num_classes: int = 10) -> PreActResNet:
    return PreActResNet(depth, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: 3x3 stem, stages of 64/128/256/512 channels."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, c = [], 64
        for i, c_out in enumerate((64, 128, 256, 512)):
            for j in range(2):
                layers.append(BasicBlock(c, c_out, 2 if i and j == 0 else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18_cifar(num_classes: int = 10) -> ResNet18:
    return ResNet18(num_classes)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (with the stride) -> 1x1, four times wider out."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet50(nn.Module):
    """ResNet-50 v1.5 for ImageNet (the paper's ImageNet network); ``width`` scales every stage
    (64: the real one)."""

    def __init__(self, num_classes: int = 1000, width: int = 64, blocks: tuple = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, c = [], width
        for i, n in enumerate(blocks):
            for j in range(n):
                layers.append(Bottleneck(c, width * 2**i, 2 if i and j == 0 else 1))
                c = 4 * width * 2**i
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def compile_regions(self, compile_fn) -> None:
        """Regional compilation: the stem, every bottleneck and the classifier through
        ``compile_fn``. The blocks after a stage's first share one code object and shapes, so
        one graph serves them all: 8 block graphs for ResNet-50's 16 blocks, about half the
        compile work of one whole-network graph, with every convolution in a compiled region."""
        self.stem = compile_fn(self.stem)
        for i, block in enumerate(self.layers):
            self.layers[i] = compile_fn(block)
        self.fc = compile_fn(self.fc)


def resnet50(num_classes: int = 1000) -> ResNet50:
    return ResNet50(num_classes)


def cnn(name: str) -> nn.Module:
    """A network by name: ``resnet18`` (CIFAR-style), ``preact<depth>`` (a PreAct-ResNet of depth
    6n + 2: ``preact20``, ``preact56``, ...), ``resnet50``."""
    factories = {"resnet18": resnet18_cifar, "resnet50": resnet50}
    if name in factories:
        return factories[name]()
    if name.startswith("preact") and name[len("preact"):].isdigit():
        return preact_resnet(int(name[len("preact"):]))
    raise ValueError(f"unknown network {name!r}; choose one of resnet18, preact<depth> (6n + 2: preact20, preact56, ...), "
                     "resnet50")
