"""``fqt results``: train on real data under every recipe and write ``docs/results.md``.

Two tasks, same seed and data order for every recipe:

* a GPT-2-style byte-level language model (2 layers, width 64, context 64) on the English
  text of Python's own documentation (``pydoc_data.topics``, shipped with Python): 90% train /
  10% held-out, validation loss in nats per byte;
* the demo CNN on scikit-learn's digits: training loss and test accuracy.

Recipes: exact, qat, ptq/psq/bhq at 8, 5 and 4 bits, int8. By default quantization runs in
kernels mode: every realizable GEMM and convolution GEMM on its low-bit kernel, so "time per
step" is fqt's; ``execution="reference"`` simulates everything (the same numerics to round-off)
and times the simulation instead.

matplotlib and the demo's data are imported when a plot or a run needs them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import fqt_compiler as fqt

RECIPES = ["exact", "qat", "ptq8", "psq8", "bhq8", "ptq5", "psq5", "bhq5", "ptq4", "psq4", "bhq4", "int8"]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5  # attention as matmuls: quantized
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteGPT(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)  # GPT-2's init: logits start near uniform

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.ln(self.blocks(x)) @ self.tok.weight.t()  # tied embedding / lm-head


def text_data(context: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    import pydoc_data.topics as topics

    data = torch.tensor(list("".join(topics.topics[k] for k in sorted(topics.topics)).encode()), dtype=torch.long)
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def _windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


def train_lm(recipe: str, steps: int, batch: int = 16, context: int = 64, seed: int = 0, execution: str = "kernels") -> dict:
    train, val = text_data(context)
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = ByteGPT(context=context)
    compiled = torch.compile(model, backend=fqt.backend(recipe=recipe, execution=execution))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    curve, start = [], None
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()  # step 0 compiles
        x, y = _windows(train, torch.randint(0, len(train) - context - 1, (batch,), generator=gen), context)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(compiled(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        curve.append(loss.item())
    per_step = (time.perf_counter() - start) / max(steps - 1, 1)
    vgen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        x, y = _windows(val, torch.randint(0, len(val) - context - 1, (64,), generator=vgen), context)
        val_loss = F.cross_entropy(compiled(x).flatten(0, 1), y.flatten()).item()
    return {"curve": curve, "val": val_loss, "step_ms": 1e3 * per_step}


def train_cnn(recipe: str, epochs: int, seed: int = 0, execution: str = "kernels") -> dict:
    from fqt_compiler.tools.demo import run_recipe, load_digits

    r = run_recipe(recipe, load_digits(seed), epochs=epochs, batch_size=64, seed=seed, var_draws=2, sampling_var=None,
                   mode=execution)
    return {"loss": r.final_loss, "acc": r.test_accuracy, "curve": r.step_losses, "step_ms": r.step_ms}


def main(
    out_dir: str = "docs", steps: int = 300, epochs: int = 3, recipes: list[str] | None = None, execution: str = "kernels"
) -> str:
    recipes = recipes or RECIPES
    lm, cnn = {}, {}
    for name in recipes:
        lm[name] = train_lm(name, steps, execution=execution)
        cnn[name] = train_cnn(name, epochs, execution=execution)
        print(
            f"  {name:6s} LM train {lm[name]['curve'][-1]:.3f} val {lm[name]['val']:.3f} | CNN acc {100 * cnn[name]['acc']:.1f}%",
            flush=True,
        )
    rows = [
        [n, f"{sum(lm[n]['curve'][-20:]) / 20:.3f}", f"{lm[n]['val']:.3f}", f"{lm[n]['step_ms']:.0f}", f"{cnn[n]['loss']:.4f}",
         f"{100 * cnn[n]['acc']:.1f}%", f"{cnn[n]['step_ms']:.0f}"]
        for n in recipes
    ]
    table = tabulate(
        rows,
        headers=["recipe", "LM train loss (last 20)", "LM val loss", "LM ms/step", "CNN train loss", "CNN test acc",
                 "CNN ms/step"],
        tablefmt="github",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm_plot = _plot(out / "results_lm.png", lm, "train loss (nats/byte, 10-step mean)", "byte-level GPT on pydoc text")
    cnn_plot = _plot(out / "results_cnn.png", cnn, "train loss (10-step mean)", "residual CNN on digits")
    return table + "\n\n" + lm_plot + "\n" + cnn_plot


def _plot(path: Path, runs: dict, ylabel: str, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss curves"
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        c = torch.tensor(r["curve"])
        smooth = torch.nn.functional.avg_pool1d(c[None, None], min(10, len(c)), 1).flatten()
        ax.plot(smooth, label=name, lw=1.8 if name in ("exact", "qat") else 1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(ncol=3, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
