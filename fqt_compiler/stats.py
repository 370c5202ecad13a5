"""The statistical framework: the bias and variance quantization adds to the gradient.

Setting (docs/quantizers.md §4): the FQT gradient is a stochastic estimator of the QAT gradient
(same forward, exact backward). Over minibatches and quantization noise,

    Var[FQT grad] = Var_batches[QAT grad] + E_batches[ Var_quant[FQT grad | batch] ]     (Thm 2)

and the quantization part is a sum over quantizers, with no cross terms. This module measures
every term on a real model:

* ``sampling_variance``: the QAT gradient's variance across minibatches, per layer;
* ``quantization_variance`` and ``bias``: Monte Carlo over repeated backward passes on one fixed
  batch (same forward, fresh quantization noise each time), and a test of the mean FQT gradient
  against the QAT gradient (Thm 1: E[FQT | batch] = QAT);
* ``profile``: each layer's contribution, by making that layer's gradient quantizers exact and
  differencing; Thm 2 says the contributions add up to the total;
* ``quantizers``: for the gradient tensors the quantizers actually saw, the exact conditional
  variance, the closed-form bound (``stats_formulas``) and a Monte Carlo figure;
* ``advise_bits``: per layer, the smallest bit width for PTQ / PSQ / BHQ keeping that layer's
  quantization variance below ``alpha`` times its share of the sampling variance.

Variances are traces (sums over parameter entries). Everything runs in ``execution="reference"``
(the quantizers observed are the reference ops), and leaves the model's state as it found it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tabulate import tabulate
from torch import nn

from .backend import FQTBackend
from .config import FQTConfig
from .recipes import GradInputSpecs, GradWeightSpecs, Recipe, recipe as recipe_by_name
from .reference import capture_quantizer_inputs, fake_quantize_ref
from .rules import Rule
from .stats_formulas import bound_expression, exact_variance, variance_bound

__all__ = ["LayerStats", "QuantizerStats", "GradientStats", "qat_counterpart", "gradient_stats", "advise_bits", "BitAdvice"]

LossFn = Callable[[nn.Module, object], torch.Tensor]


def qat_counterpart(r: Recipe) -> Recipe:
    """The recipe with the same forward and an exact backward: what FQT estimates."""
    return Recipe(
        name=f"{r.name}-qat",
        output=r.output,
        grad_input=GradInputSpecs(grad_output=None, weight=r.grad_input.weight),
        grad_weight=GradWeightSpecs(grad_output=None, activation=r.grad_weight.activation),
    )


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else "<root>"


# The reference quantizers run op by op: a report compiles one graph per configuration (per
# recipe, per layer of the profile), and Inductor's code generation would cost more than the
# draws it speeds up. The draws are the same bits either way (the noise is a hash of the seed and
# the element's index).
_STATS_OPTIONS = {"execution": "reference", "inductor": False}


class _Runner:
    """One compiled model per configuration, its gradients, and the model state restored."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]

    def grads(self, recipe: Recipe, batches: Sequence, seeds: Sequence[int], rules: tuple = ()) -> torch.Tensor:
        """(len(seeds) * len(batches), n_params) flat gradients; seeds x batches."""
        state = copy.deepcopy(self.model.state_dict())
        torch._dynamo.reset()  # one compile per configuration, none reused across them
        be = FQTBackend(FQTConfig.from_options(_STATS_OPTIONS | {"recipe": recipe, "rules": list(rules)}))
        compiled = torch.compile(self.model, backend=be)
        out = []
        try:
            for seed in seeds:
                for batch in batches:
                    self.model.load_state_dict(state)
                    self.model.zero_grad(set_to_none=True)
                    torch.manual_seed(seed)
                    self.loss_fn(compiled, batch).backward()
                    out.append(torch.cat(
                        [p.grad.detach().reshape(-1).double() for n, p in self.model.named_parameters() if n in self.names]
                    ))
        finally:
            self.model.load_state_dict(state)
            self.model.zero_grad(set_to_none=True)
            torch._dynamo.reset()
        return torch.stack(out)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for n, p in self.model.named_parameters():
            if n in self.names:
                layer = _layer_of(n)
                s = out.get(layer)
                out[layer] = slice(s.start if s else start, start + p.numel())
                start += p.numel()
        return out


@dataclass
class LayerStats:
    """Per layer (module owning parameters): traces of variances, bias test."""

    layer: str
    sampling_variance: float
    quantization_variance: float
    bias_z: float  # z-score of ||mean FQT - QAT||^2 against tr(Sigma)/n; about N(0, 1) if unbiased
    contribution: float | None = None  # from the profile: this layer's quantizers' share


@dataclass
class QuantizerStats:
    """One gradient quantization seen in a backward pass."""

    index: int
    shape: tuple
    spec: str
    exact: float
    monte_carlo: float
    bound: float
    formula: str


@dataclass
class GradientStats:
    recipe: str
    draws: int
    layers: list[LayerStats]
    sampling_variance: float
    quantization_variance: float
    bias_z: float
    biased: bool
    profile_sum: float | None = None
    quantizers: list[QuantizerStats] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            [s.layer, f"{s.sampling_variance:.4g}", f"{s.quantization_variance:.4g}",
             f"{s.quantization_variance / s.sampling_variance:.3g}" if s.sampling_variance else "-",
             "-" if s.contribution is None else f"{s.contribution:.4g}", f"{s.bias_z:+.2f}"]
            for s in self.layers
        ]
        rows.append(["total", f"{self.sampling_variance:.4g}", f"{self.quantization_variance:.4g}",
                     f"{self.quantization_variance / self.sampling_variance:.3g}" if self.sampling_variance else "-",
                     "-" if self.profile_sum is None else f"{self.profile_sum:.4g} (sum)", f"{self.bias_z:+.2f}"])
        head = ["layer", "sampling var (QAT)", "quant var (FQT)", "quant / sampling", "profile contribution", "bias z"]
        verdict = "BIASED: the mean FQT gradient differs from QAT's" if self.biased else "no evidence of bias (Thm 1)"
        out = (
            f"gradient statistics, recipe {self.recipe}, {self.draws} draws: {verdict}\n"
            + tabulate(rows, headers=head, tablefmt="github")
        )
        if self.quantizers:
            q = [[s.index, "x".join(map(str, s.shape)), s.spec, f"{s.exact:.4g}", f"{s.monte_carlo:.4g}", f"{s.bound:.4g}",
                  f"{s.exact / s.bound:.2f}" if s.bound else "-"]
                 for s in self.quantizers]
            out += "\n\n" + tabulate(
                q, headers=["quantizer", "input", "spec", "exact var", "Monte Carlo", "bound", "exact / bound"], tablefmt="github"
            )
        return out

    def __str__(self) -> str:
        return self.table()


def _bias_z(draws: torch.Tensor, qat: torch.Tensor) -> tuple[float, bool]:
    """z-score of ||mean FQT - QAT||^2 against its expectation under no bias.

    ``draws`` is (n, p): n FQT gradients of one batch. Unbiased (Thm 1), the mean of n draws
    has E||mean - QAT||^2 = tr(Sigma) / n, so rho = ||mean - QAT||^2 / (tr(Sigma) / n) is about 1
    with a spread of sqrt(2 / k_eff), k_eff = tr(Sigma)^2 / tr(Sigma^2) the effective number of
    independent directions. Entries of a gradient share quantization noise, so tr(Sigma^2) is
    taken from the n x n Gram matrix of the centered draws, not from per-entry variances. A
    bias adds n ||bias||^2 / tr(Sigma) to rho. A deterministic deviation (no variance at all,
    nonzero difference, e.g. nearest rounding) is bias outright."""
    n = draws.shape[0]
    if n < 2:
        raise ValueError(f"the bias test needs at least 2 draws, got {n}")
    mean = draws.mean(0)
    centered = draws - mean
    trace = float((centered**2).sum()) / (n - 1)
    diff2 = float(((mean - qat) ** 2).sum())
    scale = float(qat.abs().max().clamp_min(1e-30))
    if trace <= (1e-6 * scale) ** 2 * draws.shape[1]:  # no noise: any deviation is a bias
        deterministic = diff2 ** 0.5 > 1e-5 * scale
        return (math.inf if deterministic else 0.0), deterministic
    gram = centered @ centered.t()
    trace_sq = float((gram**2).sum()) / (n - 1) ** 2
    # fp32 round-off between the QAT and FQT graphs, as a floor on the noise
    rho = diff2 / (trace / n + (1e-6 * scale) ** 2 * draws.shape[1])
    k_eff = trace**2 / trace_sq
    return (rho - 1) / math.sqrt(2 / k_eff), False


def gradient_stats(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence,
    recipe: str | Recipe,
    *,
    draws: int = 32,
    profile: bool = True,
    quantizers: bool = True,
    quantizer_draws: int = 64,
    z_threshold: float = 4.0,
) -> GradientStats:
    """Measure the sampling variance, quantization variance, bias and per-layer profile of
    ``recipe`` on ``model`` (see the module docstring). ``loss_fn(model, batch)`` returns the
    loss; ``batches[0]`` is the fixed batch of the Monte-Carlo measurements."""
    r = recipe_by_name(recipe)
    if len(batches) < 2:
        raise ValueError("gradient_stats needs at least 2 batches to measure the sampling variance")
    run = _Runner(model, loss_fn)
    qat = run.grads(qat_counterpart(r), batches, seeds=[0])
    fqt_draws = run.grads(r, batches[:1], seeds=range(1, draws + 1))
    sampling = qat.var(0)
    qvar = fqt_draws.var(0)
    layers = []
    any_biased = False
    for layer, sl in run.slices().items():
        z, det = _bias_z(fqt_draws[:, sl], qat[0, sl])
        any_biased |= det or z > z_threshold
        layers.append(LayerStats(layer, float(sampling[sl].sum()), float(qvar[sl].sum()), z))
    z_all, det_all = _bias_z(fqt_draws, qat[0])
    stats = GradientStats(
        r.name, draws, layers, float(sampling.sum()), float(qvar.sum()), z_all, any_biased or det_all or z_all > z_threshold
    )
    if profile:
        total = float(qvar.sum())
        contributions = 0.0
        for s in stats.layers:
            exact = Rule(
                name=f"exact-{s.layer}", module=s.layer, gemm=("grad_input", "grad_weight", "grad_lhs", "grad_rhs"),
                specs={"grad_input.grad_output": None, "grad_weight.grad_output": None},
            )
            without = run.grads(r, batches[:1], seeds=range(1, draws + 1), rules=(exact,))
            s.contribution = total - float(without.var(0).sum())
            contributions += s.contribution
        stats.profile_sum = contributions
    if quantizers:
        stats.quantizers = _quantizer_stats(model, loss_fn, batches[0], r, quantizer_draws)
    return stats


def _quantizer_stats(model, loss_fn, batch, r: Recipe, n: int) -> list[QuantizerStats]:
    state = copy.deepcopy(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=FQTBackend(FQTConfig.from_options(_STATS_OPTIONS | {"recipe": r})))
    try:
        with capture_quantizer_inputs() as seen:
            loss_fn(compiled, batch).backward()
    finally:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
    out = []
    for k, (x, spec, layout) in enumerate(seen):
        draws = torch.stack([fake_quantize_ref(x, spec, layout).double() for _ in range(n)])
        try:
            exact, bound, formula = exact_variance(x, spec, layout), variance_bound(x, spec, layout), str(bound_expression(spec))
        except ValueError:  # custom quantizers: Monte Carlo only
            exact = bound = float("nan")
            formula = "-"
        out.append(QuantizerStats(k, tuple(x.shape), spec.short(), exact, float(draws.var(0).sum()), bound, formula))
    return out


@dataclass
class BitAdvice:
    layer: str
    bits: dict[str, int | None]  # family -> smallest bits meeting the budget (None: not even 8)
    budget: float


def advise_bits(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence,
    *,
    alpha: float = 0.1,
    base_bits: int = 4,
    draws: int = 16,
    families: Sequence[str] = ("ptq", "psq", "bhq"),
) -> tuple[list[BitAdvice], dict[str, float], float]:
    """Per layer and quantizer family, the smallest b in 2..8 such that the layer's quantization
    variance stays below ``alpha`` x (sampling variance / number of quantized layers).

    Each layer's contribution is measured at ``base_bits`` (its gradient quantizers alone) and
    scaled by ((2^base - 1) / (2^b - 1))^2, the law of every bound in docs/quantizers.md §3 (a
    prediction: the exact variance follows it closely, not exactly). Returns the advice, the
    predicted total quantization variance per family with those bits, and the sampling variance.
    """
    if not 0 < alpha:
        raise ValueError(f"alpha={alpha} must be positive")
    run = _Runner(model, loss_fn)
    qat = run.grads(qat_counterpart(recipe_by_name(f"psq{base_bits}")), batches, seeds=[0])
    sampling = float(qat.var(0).sum())
    layers = list(run.slices())
    base: dict[str, dict[str, float]] = {fam: {} for fam in families}
    for fam in families:
        r = recipe_by_name(f"{fam}{base_bits}")
        for layer in layers:  # this layer's gradient quantizers alone
            others = Rule(
                name="only-this-layer", where=lambda s, layer=layer: s.module_path != layer,
                gemm=("grad_input", "grad_weight", "grad_lhs", "grad_rhs"),
                specs={"grad_input.grad_output": None, "grad_weight.grad_output": None},
            )
            base[fam][layer] = float(run.grads(r, batches[:1], seeds=range(1, draws + 1), rules=(others,)).var(0).sum())
    # layers with no gradient quantizer of their own (BatchNorm, ...) take no share of the budget
    quantized = [layer for layer in layers if any(base[fam][layer] > 0 for fam in families)]
    budget = alpha * sampling / max(len(quantized), 1)
    advice = [BitAdvice(layer, {}, budget) for layer in quantized]
    totals: dict[str, float] = {}
    for fam in families:
        totals[fam] = 0.0
        for a in advice:
            var0 = base[fam][a.layer]
            scaled = {bits: var0 * ((2**base_bits - 1) / (2**bits - 1)) ** 2 for bits in range(2, 9)}
            a.bits[fam] = next((bits for bits, v in scaled.items() if v <= budget), None)
            totals[fam] += scaled[a.bits[fam] or 8]
    return advice, totals, sampling
