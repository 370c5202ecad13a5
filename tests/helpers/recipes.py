"""Recipe helpers shared by tests."""

from __future__ import annotations

import fqt_compiler as fqt
from fqt_compiler.recipes import GradInputSpecs, GradWeightSpecs, Recipe


def nearest_gradients(name: str) -> Recipe:
    """Recipe ``name`` with round-to-nearest gradient quantizers: same layouts, no randomness
    (deterministic comparisons), and deliberately biased (the bias test must reject it)."""
    base = fqt.recipe(name)
    near = dict(rounding="nearest")
    return Recipe(
        name=f"{name}-nearest",
        output=base.output,
        grad_input=GradInputSpecs(grad_output=base.grad_input.grad_output.with_(**near), weight=base.grad_input.weight),
        grad_weight=GradWeightSpecs(
            grad_output=base.grad_weight.grad_output.with_(**near), activation=base.grad_weight.activation
        ),
    )
