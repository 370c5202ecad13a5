"""Tiny coverage models and their input factories for the backend and pass tests.

Every model is small enough that a reference-mode compile takes about a second. Each entry of
:data:`MODELS` builds ``(model, inputs, loss_fn)`` from a seed; the expected number of GEMMs the
fqt passes should quantize is documented next to every model (3 per Linear/conv whose input
requires grad: output, grad_input, grad_weight; 2 when the input does not require grad).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLP",
    "CNN",
    "GPTBlock",
    "SDPABlock",
    "SharedInputLinears",
    "Case",
    "MODELS",
    "make_case",
    "param_grads",
]


class MLP(nn.Module):
    """Linear -> ReLU -> Linear -> ReLU -> Linear. Expected GEMMs: 2 + 3 + 3 = 8."""

    n_gemms = 8

    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Plain conv, grouped conv (groups=2), depthwise conv, BatchNorm, a residual block, Linear head.

    Expected GEMMs: conv1 2 (its input is the image) + gconv 3 + dwconv 3 + pwconv 3 + head 3 = 14.
    """

    n_gemms = 14

    def __init__(self, c_in: int = 3, c: int = 8, n_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1, bias=False)  # plain
        self.bn1 = nn.BatchNorm2d(c)
        # residual block: grouped 3x3 -> BN -> ReLU -> depthwise 3x3 -> pointwise 1x1 (with bias) -> BN
        self.gconv = nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pwconv = nn.Conv2d(c, c, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        r = F.relu(self.bn2(self.gconv(h)))
        r = self.bn3(self.pwconv(self.dwconv(r)))
        h = F.relu(h + r)
        return self.head(h.mean(dim=(2, 3)))


class GPTBlock(nn.Module):
    """Token + position embedding, one pre-LN transformer block, final LN, lm-head tied to the
    token embedding. Attention is written with ``torch.matmul`` and softmax (no SDPA).

    Expected GEMMs: qkv, proj, fc, fc2, lm_head (5 Linears on 3-D inputs, all inputs require
    grad) 5 x 3 + the two attention matmuls (activation x activation: output, grad_lhs,
    grad_rhs) 2 x 3 = 21.
    """

    n_gemms = 21

    def __init__(self, vocab: int = 16, d: int = 8, n_head: int = 2, block: int = 6) -> None:
        super().__init__()
        self.n_head = n_head
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)
        att = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = torch.matmul(att, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        x = x + self.attention(self.ln1(x))
        x = x + self.fc2(F.gelu(self.fc(self.ln2(x))))
        return self.lm_head(self.ln_f(x))


class SDPABlock(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention`` (a fused attention op).

    Expected: the Linears q, k, v, out quantized (q/k/v take the input tensor, which requires
    grad in the tests: 4 x 3 = 12 GEMMs) and the attention node reported as skipped.
    """

    n_linear_gemms = 12

    def __init__(self, d: int = 8, n_head: int = 2) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hd = C // self.n_head

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, hd).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class SharedInputLinears(nn.Module):
    """Two Linears (q and k projections) reading the same activation, then a product of them.

    With the paper's recipes both Linears quantize ``x`` with the same spec and layout, so the
    dedupe pass should keep one quantization of ``x``.
    """

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * torch.tanh(self.k(x))


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A model, its inputs and the scalar loss of one training step."""

    name: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    n_gemms: int

    def loss(self, model: Callable) -> torch.Tensor:
        return self.loss_fn(model(*self.inputs))


def _mlp(seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP()
    x = torch.randn(6, 8, generator=g)
    target = torch.randn(6, 4, generator=g)
    return Case("mlp", model, (x,), lambda out: F.mse_loss(out, target), MLP.n_gemms)


def _cnn(seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CNN()
    x = torch.randn(4, 3, 6, 6, generator=g)
    labels = torch.randint(0, 5, (4,), generator=g)
    return Case("cnn", model, (x,), lambda out: F.cross_entropy(out, labels), CNN.n_gemms)


def _gpt(seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPTBlock()
    idx = torch.randint(0, 16, (2, 6), generator=g)
    targets = torch.randint(0, 16, (2, 6), generator=g)
    return Case(
        "gpt", model, (idx,), lambda out: F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1)), GPTBlock.n_gemms
    )


MODELS: dict[str, Callable[[int], Case]] = {"mlp": _mlp, "cnn": _cnn, "gpt": _gpt}


def make_case(name: str, seed: int = 0) -> Case:
    return MODELS[name](seed)


def param_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter's ``.grad`` (tied parameters appear once)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
