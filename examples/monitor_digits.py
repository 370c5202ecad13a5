"""Live numerics monitoring on the demo CNN: find the layer whose quantization went wrong.

    python -m examples.monitor_digits --out fqt_monitor.jsonl            # one layer given 2-bit gradients
    python -m examples.monitor_digits --out fixed.jsonl --policy         # ... and the adaptive policy fixing it
    fqt monitor fqt_monitor.jsonl --plot monitor.png

Trains ``DigitsNet`` (the ``fqt demo`` CNN) on scikit-learn's digits under the ``int8`` recipe,
with a rule that gives ``block.conv1`` 2-bit per-tensor gradients (``--bad clip`` instead gives
it a forward quantizer clipping at +-0.01), a monitor sampling every 10th step, and a JSON-lines
log. Prints the monitor's per-site table and the final loss.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fqt_compiler as fqt
from fqt_compiler.tools.demo import DigitsNet, load_digits

BAD = "block.conv1"


def _tiny_clip(x, spec, generator=None):
    return x.clamp(-0.01, 0.01)


def bad_rule(kind: str) -> fqt.Rule | None:
    """The deliberately bad site: ``"grad"`` (2-bit gradients), ``"clip"`` (clipping forward), ``"none"``."""
    if kind == "grad":
        two = fqt.QuantSpec(bits=2, granularity="tensor", rounding="stochastic")
        return fqt.Rule(name="2-bit gradients", module=BAD, specs={"grad_input.grad_output": two, "grad_weight.grad_output": two})
    if kind == "clip":
        fqt.register_quantizer("tiny_clip", _tiny_clip, unbiased=False, replace=True)
        clip = fqt.QuantSpec(quantizer="tiny_clip")
        return fqt.Rule(name="clipping", module=BAD, gemm="output", specs={"output.activation": clip})
    return None


def train(out: str, bad: str = "grad", policy: bool = False, steps: int = 300, every: int = 10,
          **options) -> tuple[fqt.Monitor, list[float]]:
    """Train with a monitor writing ``out``; returns the monitor and the per-step losses.
    ``options`` go to the backend (``execution="reference"``: seconds to compile, for tests)."""
    xtr, ytr, _, _ = load_digits(0)
    torch.manual_seed(0)
    model = DigitsNet()
    rule = bad_rule(bad)
    mon = fqt.Monitor(every=every, sinks=[out], policy=fqt.AdaptivePolicy() if policy else None)
    step = torch.compile(model, backend=fqt.backend(recipe="int8", rules=[rule] if rule else [], monitor=mon, **options))
    losses = sgd_steps(model, step, xtr, ytr, steps)
    mon.sinks[0].close()
    return mon, losses


def sgd_steps(model: nn.Module, step, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 64) -> list[float]:
    """``steps`` SGD steps (momentum 0.9, gradient norm clipped at 1, as training loops do: one
    bad step stays one step) of the compiled ``step`` on seeded minibatches; the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for i in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=torch.Generator().manual_seed(i))
        loss = F.cross_entropy(step(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fqt_monitor.jsonl")
    parser.add_argument("--bad", choices=["grad", "clip", "none"], default="grad")
    parser.add_argument("--policy", action="store_true", help="let fqt.AdaptivePolicy fix the alerting sites")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    mon, losses = train(args.out, args.bad, args.policy, args.steps)
    print(mon.table())
    print(f"\nalerts: {len(mon.alerts)}; mean loss of the last 20 steps: {sum(losses[-20:]) / 20:.4f}; log: {args.out}")


if __name__ == "__main__":
    main()
