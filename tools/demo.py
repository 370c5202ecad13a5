"""``fqt demo``: train a small CNN on scikit-learn's handwritten digits under each paper recipe.

Every recipe starts from the same initial weights and sees the same batches (same seed). The
table reports the final training loss, test accuracy (evaluated with the quantized forward, as
the paper does), the gradient quantization variance measured at step 0 on the shared initial
weights, relative to QAT's minibatch sampling variance (Theorem 2: FQT trains like QAT when this
is << 1), and wall time. Quantization is *simulated* here (reference mode: dequantize, then an
fp32 GEMM) by default, so the times measure the simulation overhead, not low-bit speed;
``--mode kernels`` runs every realizable GEMM -- convolutions included -- on int8 kernels, and
the ``step ms`` column is then a low-bit training step's time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

import fqt_compiler as fqt

DEFAULT_RECIPES = ("exact", "qat", "ptq8", "psq8", "bhq8", "ptq4", "psq4", "bhq4")


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class DigitsNet(nn.Module):
    """conv-BN-ReLU, one residual block, 2x2 max-pool, Linear head: 8x8 digits -> 10 classes."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.block = ResidualBlock(channels)
        self.head = nn.Linear(channels * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.max_pool2d(self.block(x), 2)
        return self.head(x.flatten(1))


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits shipped inside scikit-learn: 80/20 train/test split, standardized."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("fqt demo needs scikit-learn for its data set: pip install scikit-learn") from exc
    data = _load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(y))
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _grad(compiled, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(compiled(x), y).backward()
    return _flat_grad(model)


def _variance(grads: list[torch.Tensor]) -> float:
    g = torch.stack(grads)
    return float(g.var(dim=0, unbiased=True).sum())


@dataclass
class RunResult:
    recipe: str
    final_loss: float
    test_accuracy: float
    quant_variance: float
    seconds: float
    step_losses: list[float] = field(default_factory=list)  # every training step's loss
    step_ms: float = float("nan")  # mean wall time of a training step


def run_recipe(
    name: str, data, *, epochs: int, batch_size: int, seed: int, var_draws: int, sampling_var: float | None,
    mode: str = "reference",
):
    x_train, y_train, x_test, y_test = data
    torch._dynamo.reset()  # one process trains many models: start each from a clean cache
    torch.manual_seed(seed)
    model = DigitsNet()
    compiled = torch.compile(model, backend=fqt.backend(recipe=name, execution=mode))
    start = time.perf_counter()

    # Quantization variance at step 0 (shared initial weights, one fixed batch).
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xb, yb = x_train[:batch_size], y_train[:batch_size]
    quant_var = _variance([_grad(compiled, model, xb, yb) for _ in range(var_draws)])
    model.load_state_dict(state)

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    step_losses: list[float] = []
    train_start = None  # set after the first step, which compiles
    for epoch in range(epochs):
        perm = torch.randperm(len(y_train), generator=gen)
        epoch_losses = []
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(compiled(x_train[idx]), y_train[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"recipe {name}: loss became {loss.item()} at epoch {epoch}")
            loss.backward()
            opt.step()
            epoch_losses.append(loss.item())
            if train_start is None:
                train_start = time.perf_counter()
        step_losses.extend(epoch_losses)
        losses.append(sum(epoch_losses) / len(epoch_losses))
        print(f"  {name:6s} epoch {epoch + 1}/{epochs}  train loss {losses[-1]:.4f}", flush=True)
    steps_timed = len(step_losses) - 1
    step_ms = 1e3 * (time.perf_counter() - train_start) / steps_timed if steps_timed > 0 else float("nan")
    model.eval()
    with torch.no_grad():
        acc = float((compiled(x_test).argmax(1) == y_test).float().mean())
    seconds = time.perf_counter() - start
    rel = quant_var / sampling_var if sampling_var else float("nan")
    return RunResult(name, losses[-1], acc, rel, seconds, step_losses, step_ms)


def qat_sampling_variance(data, *, batch_size: int, seed: int, batches: int) -> float:
    """Minibatch sampling variance of the QAT gradient at the shared initial weights."""
    x_train, y_train = data[0], data[1]
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = DigitsNet()
    compiled = torch.compile(model, backend=fqt.backend(recipe="qat", execution="reference"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = []
    for b in range(batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        grads.append(_grad(compiled, model, x_train[sl], y_train[sl]))
    model.load_state_dict(state)
    return _variance(grads)


def main(
    recipes: list[str] | None = None,
    epochs: int = 3,
    batch_size: int = 64,
    seed: int = 0,
    var_draws: int = 16,
    mode: str = "reference",
) -> list[RunResult]:
    recipes = list(recipes or DEFAULT_RECIPES)
    for r in recipes:
        fqt.recipe(r)  # fail fast on a bad name, before any training
    print(
        f"fqt demo: DigitsNet on scikit-learn digits, recipes {', '.join(recipes)}; "
        f"{epochs} epochs, batch {batch_size}, seed {seed}"
    )
    if mode == "reference":
        print("quantization is simulated (reference mode: quantize-dequantize, then fp32 GEMMs)", flush=True)
    else:
        print("kernels mode: every realizable GEMM (convolutions and the Linear head) runs on an int8 kernel", flush=True)
    data = load_digits(seed)
    sampling_var = qat_sampling_variance(data, batch_size=batch_size, seed=seed, batches=16)
    results = []
    for name in recipes:
        results.append(
            run_recipe(
                name, data, epochs=epochs, batch_size=batch_size, seed=seed, var_draws=var_draws, sampling_var=sampling_var,
                mode=mode,
            )
        )
    rows = [
        [r.recipe, f"{r.final_loss:.4f}", f"{100 * r.test_accuracy:.1f}%", f"{r.quant_variance:.3g}", f"{r.step_ms:.1f}",
         f"{r.seconds:.1f}"]
        for r in results
    ]
    headers = ["recipe", "final train loss", "test acc", "grad quant var / QAT sampling var (step 0)", "step ms",
               "time incl. compile (s)"]
    print()
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(f"\nQAT minibatch sampling variance at step 0: {sampling_var:.4g} (sum over parameters, {batch_size}-sample batches)")
    return results
