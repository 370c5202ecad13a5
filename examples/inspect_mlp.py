"""Example factory for ``fqt inspect``: a two-layer MLP block on 3-D (batch, tokens, features)
inputs, the shape Linear layers see inside a transformer.

    fqt inspect examples/inspect_mlp.py:make --recipe bhq5 --out fqt_report
"""

import torch
from torch import nn


class MLPBlock(nn.Module):
    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def make():
    """Return (model, example inputs) — the factory convention of ``fqt inspect``."""
    torch.manual_seed(0)
    return MLPBlock(), (torch.randn(2, 5, 16, requires_grad=True),)
