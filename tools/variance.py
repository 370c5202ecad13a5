"""``fqt variance``: the statistical report of ``fqt_compiler.stats`` on a model.

The model comes from ``path/to/script.py:factory`` returning ``(model, loss_fn, batches)``
(``loss_fn(model, batch) -> loss``), or by default the demo's CNN on the digits data. Prints
the per-layer table (sampling vs quantization variance, profile, bias test), the per-quantizer
table (exact vs Monte Carlo vs bound), a bits sweep and the bit-width advice; with ``--out``,
writes PNG plots (matplotlib, an optional extra: ``pip install 'fqt[plots]'``).

matplotlib is imported only when a plot is asked for (an optional dependency).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

from fqt_compiler.stats import advise_bits, gradient_stats

FAMILIES = ("ptq", "psq", "bhq")


def demo_factory(n_batches: int = 8, batch_size: int = 64):
    from fqt_compiler.tools.demo import DigitsNet, load_digits

    x, y, _, _ = load_digits(0)
    torch.manual_seed(0)
    batches = [(x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]) for i in range(n_batches)]
    return DigitsNet(), (lambda model, b: F.cross_entropy(model(b[0]), b[1])), batches


def bits_sweep(model, loss_fn, batches, bits=(4, 5, 6, 7, 8), draws: int = 16) -> dict[str, list[float]]:
    """Total quantization variance of each gradient quantizer family at each bit width."""
    return {
        fam: [
            gradient_stats(
                model, loss_fn, batches, f"{fam}{b}", draws=draws, profile=False, quantizers=False
            ).quantization_variance
            for b in bits
        ]
        for fam in FAMILIES
    }


def plots(out: Path, stats, sweep, bits, sampling) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib is not installed: no plots written (pip install 'fqt[plots]' or pip install matplotlib)"]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for fam, values in sweep.items():
        ax.semilogy(bits, values, marker="o", label=fam.upper())
    ax.axhline(sampling, color="gray", ls="--", label="sampling variance (QAT)")
    ax.set_xlabel("gradient bits")
    ax.set_ylabel("quantization variance")
    ax.set_title("variance vs bits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "variance_vs_bits.png", dpi=120)
    written.append("variance_vs_bits.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [s.layer for s in stats.layers]
    idx = range(len(names))
    ax.bar([i - 0.2 for i in idx], [s.sampling_variance for s in stats.layers], 0.4, label="sampling (QAT)")
    ax.bar([i + 0.2 for i in idx], [s.quantization_variance for s in stats.layers], 0.4, label=f"quantization ({stats.recipe})")
    ax.set_xticks(list(idx), names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_title("per-layer gradient variance")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "per_layer.png", dpi=120)
    written.append("per_layer.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = [f"{fam}{bits[0]}" for fam in sweep]
    ax.bar(labels, [sampling] * len(labels), label="sampling")
    ax.bar(labels, [sweep[fam][0] for fam in sweep], bottom=[sampling] * len(labels), label="quantization")
    ax.set_title("total gradient variance = sampling + quantization")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "split.png", dpi=120)
    written.append("split.png")
    plt.close("all")
    return [f"wrote {out / w}" for w in written]


def main(
    factory=None, recipe: str = "psq4", draws: int = 32, alpha: float = 0.1, out: str | None = None, sweep: bool = True
) -> str:
    model, loss_fn, batches = (factory or demo_factory)()
    stats = gradient_stats(model, loss_fn, batches, recipe, draws=draws)
    lines = [str(stats)]
    bits = (4, 5, 6, 7, 8)
    # The sweep and the advice are many estimates each (15 recipes; 3 families): at most 16 draws
    # apiece by default, fewer when fewer are asked for.
    many = min(draws, 16)
    swept = bits_sweep(model, loss_fn, batches, bits, draws=many) if sweep else {}
    if swept:
        rows = [[fam.upper(), *[f"{v:.3g}" for v in vals]] for fam, vals in swept.items()]
        lines.append("\nquantization variance by gradient bits (sampling variance: %.4g)" % stats.sampling_variance)
        lines.append(tabulate(rows, headers=["quantizer", *[f"{b} bits" for b in bits]], tablefmt="github"))
    advice, totals, sampling = advise_bits(model, loss_fn, batches, alpha=alpha, draws=many)
    rows = [[a.layer, *[a.bits[f] if a.bits[f] else "> 8" for f in FAMILIES]] for a in advice]
    lines.append(
        f"\nbit-width advice: smallest bits keeping each layer's quantization variance <= {alpha} x sampling / "
        f"{len(advice)} quantized layers"
    )
    lines.append(tabulate(rows, headers=["layer", *[f.upper() for f in FAMILIES]], tablefmt="github"))
    lines.append(
        "predicted total quantization variance with that advice: "
        + ", ".join(f"{f.upper()} {t:.3g}" for f, t in totals.items())
        + f" (alpha x sampling = {alpha * sampling:.3g})"
    )
    if out:
        lines.extend(plots(Path(out), stats, swept, bits, stats.sampling_variance) if swept else ["--no-sweep: no plots"])
    return "\n".join(lines)
