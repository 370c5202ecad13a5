"""Pointwise programs: the producer chain of a quantize node, as data.

A :class:`Program` is what prologue fusion cuts out of a graph: a straight-line list of
pointwise ops over *leaves* (tensors broadcastable to the chain's shape, or Python scalars)
whose last value is the tensor the quantizer reads. It is serialised into the ``fqt::
fused_quantize`` call (a JSON string), so a compiled graph is self-describing: the Triton
kernel is generated from it on first use in any process.

Two interpreters of the same program, which must agree:

* :func:`run_reference`: eager torch ops, one per step, each result rounded to its dtype as
  eager PyTorch does (the unfused path);
* :func:`triton_lines`: Triton statements computing the same values in fp32 registers, with
  the same per-op rounding to bf16 / fp16 where the graph had it.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

__all__ = ["Program", "OPS", "build_program", "run_reference", "triton_lines", "reference_partials"]

aten = torch.ops.aten
prims = torch.ops.prims

# aten overload -> (program name, number of tensor/scalar operands)
OPS: dict = {
    aten.add.Tensor: ("add", 2), aten.sub.Tensor: ("sub", 2), aten.mul.Tensor: ("mul", 2), aten.div.Tensor: ("div", 2),
    aten.add.Scalar: ("add", 2), aten.sub.Scalar: ("sub", 2), aten.mul.Scalar: ("mul", 2), aten.div.Scalar: ("div", 2),
    aten.neg.default: ("neg", 1), aten.relu.default: ("relu", 1), aten.sigmoid.default: ("sigmoid", 1),
    aten.tanh.default: ("tanh", 1), aten.silu.default: ("silu", 1), aten.exp.default: ("exp", 1),
    aten.gelu.default: ("gelu", 1), aten.gelu_backward.default: ("gelu_backward", 2),
    aten.threshold_backward.default: ("threshold_backward", 3), aten.sigmoid_backward.default: ("sigmoid_backward", 2),
    aten.tanh_backward.default: ("tanh_backward", 2), aten.pow.Tensor_Scalar: ("pow", 2),
    prims.convert_element_type.default: ("convert", 1), aten._to_copy.default: ("convert", 1),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Program:
    """``steps``: (op, operands, dtype) where an operand is ``["L", i]`` (leaf i), ``["V", j]``
    (step j's value) or a float; ``gelu`` steps carry their ``approximate`` mode in ``extra``."""

    shape: tuple[int, ...]  # the chain's output shape (the leaves broadcast to it)
    steps: tuple[tuple, ...]  # (op, operands, dtype name, extra)
    n_leaves: int

    def dumps(self) -> str:
        return json.dumps({"shape": list(self.shape), "steps": [list(s) for s in self.steps], "n_leaves": self.n_leaves})

    @staticmethod
    @functools.lru_cache(maxsize=None)  # the ops parse their program on every call
    def loads(text: str) -> "Program":
        d = json.loads(text)
        steps = tuple((s[0], tuple(tuple(o) if isinstance(o, list) else o for o in s[1]), s[2], s[3]) for s in d["steps"])
        return Program(tuple(d["shape"]), steps, d["n_leaves"])

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.steps[-1][2]]


def build_program(chain: list, operand, shape, n_leaves: int) -> Program:
    """The program of ``chain`` (fx nodes in graph order, each an ``OPS`` target); ``operand(a)``
    names a node argument outside the chain (``("L", i)``)."""
    index = {n: i for i, n in enumerate(chain)}
    steps = []
    for n in chain:
        name, arity = OPS[n.target]
        operands = [
            (("V", index[a]) if a in index else operand(a)) if hasattr(a, "users") else float(a) for a in n.args[:arity]
        ]
        extra = n.kwargs.get("approximate", "none")  # GELU's mode, positional or keyword
        if n.target is aten.gelu.default and len(n.args) > 1:
            extra = n.args[1]
        if n.target is aten.gelu_backward.default and len(n.args) > 2:
            extra = n.args[2]
        steps.append((name, tuple(operands), dtype_name(n.meta["val"].dtype), extra))
    return Program(tuple(shape), tuple(steps), n_leaves)


def dtype_name(dtype: torch.dtype) -> str | None:
    """The program's name for a floating dtype, None for dtypes fusion does not handle."""
    return {v: k for k, v in _DTYPES.items()}.get(dtype)


# ---------------------------------------------------------------- the two interpreters
_SQRT1_2 = 0.7071067811865476
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
F = torch.nn.functional


def _tl_gelu(a: list[str], extra) -> str:
    x = a[0]
    if extra == "tanh":
        return f"(0.5 * {x} * (1.0 + tanh({_SQRT_2_OVER_PI!r} * ({x} + 0.044715 * {x} * {x} * {x}))))"
    return f"(0.5 * {x} * (1.0 + tl.math.erf({x} * {_SQRT1_2!r})))"


# program op -> (eager torch on the operands, Triton expression over the operands' names);
# ``extra`` is the op's mode (GELU's approximation). Triton divides with div_rn (IEEE, as
# torch); relu keeps NaN (a comparison with NaN is false).
_IMPL: dict[str, tuple] = {
    "add": (lambda a, e: torch.add(a[0], a[1]), lambda a, e: f"({a[0]} + {a[1]})"),
    "sub": (lambda a, e: torch.sub(a[0], a[1]), lambda a, e: f"({a[0]} - {a[1]})"),
    "mul": (lambda a, e: torch.mul(a[0], a[1]), lambda a, e: f"({a[0]} * {a[1]})"),
    "div": (lambda a, e: torch.div(a[0], a[1]), lambda a, e: f"tl.math.div_rn({a[0]}, {a[1]})"),
    "neg": (lambda a, e: torch.neg(a[0]), lambda a, e: f"(-{a[0]})"),
    "relu": (lambda a, e: torch.relu(a[0]), lambda a, e: f"tl.where({a[0]} < 0.0, 0.0, {a[0]})"),
    "sigmoid": (lambda a, e: torch.sigmoid(a[0]), lambda a, e: f"tl.math.div_rn(1.0, 1.0 + tl.exp(-{a[0]}))"),
    "tanh": (lambda a, e: torch.tanh(a[0]), lambda a, e: f"tanh({a[0]})"),
    "silu": (lambda a, e: F.silu(a[0]), lambda a, e: f"tl.math.div_rn({a[0]}, 1.0 + tl.exp(-{a[0]}))"),
    "exp": (lambda a, e: torch.exp(a[0]), lambda a, e: f"tl.exp({a[0]})"),
    "pow": (lambda a, e: torch.pow(a[0], a[1]), lambda a, e: _pow_expr(a[0], float(a[1]))),
    "gelu": (lambda a, e: F.gelu(a[0], approximate=e), _tl_gelu),
    "gelu_backward": (
        lambda a, e: aten.gelu_backward(a[0], a[1], approximate=e),
        lambda a, e: f"gelu_{'tanh_' if e == 'tanh' else ''}backward({a[0]}, {a[1]})",
    ),
    "threshold_backward": (
        lambda a, e: aten.threshold_backward(a[0], a[1], a[2]), lambda a, e: f"tl.where({a[1]} <= {a[2]}, 0.0, {a[0]})"
    ),
    "sigmoid_backward": (lambda a, e: aten.sigmoid_backward(a[0], a[1]), lambda a, e: f"({a[0]} * (1.0 - {a[1]}) * {a[1]})"),
    "tanh_backward": (lambda a, e: aten.tanh_backward(a[0], a[1]), lambda a, e: f"({a[0]} * (1.0 - {a[1]} * {a[1]}))"),
    "convert": (lambda a, e: a[0], lambda a, e: a[0]),  # the rounding to the dtype follows every step
}


def _impl(op: str, which: int):
    if op not in _IMPL:
        raise ValueError(f"unknown program op {op!r}")
    return _IMPL[op][which]


def run_reference(program: Program, leaves: list[torch.Tensor]) -> torch.Tensor:
    """Evaluate ``program`` eagerly (the unfused computation, op by op)."""
    values: list = []
    for op, operands, dtype, extra in program.steps:
        args = [leaves[o[1]] if isinstance(o, tuple) and o[0] == "L" else values[o[1]] if isinstance(o, tuple) else o
                for o in operands]
        out = _impl(op, 0)(args, extra)
        values.append(out.to(_DTYPES[dtype]) if isinstance(out, torch.Tensor) else out)
    return values[-1].expand(program.shape)


# ---------------------------------------------------------------- Triton statements
def _pow_expr(x: str, y: float) -> str:
    """x ** y for a constant y: products for small integers (exact squares, no log of a
    negative base), square roots for halves, exp2(y log2 x) otherwise (NaN below 0, as torch)."""
    if y == int(y) and 1 <= abs(y) <= 8:
        prod = " * ".join([x] * int(abs(y)))
        return f"({prod})" if y > 0 else f"tl.math.div_rn(1.0, {prod})"
    if y == 0:
        return f"({x} * 0.0 + 1.0)"
    if y == 0.5:
        return f"tl.sqrt_rn({x})"
    if y == -0.5:
        return f"tl.math.div_rn(1.0, tl.sqrt_rn({x}))"
    return f"tl.where({x} < 0.0, float('nan'), tl.exp2({y!r} * tl.log2({x})))"


_ROUND = {"bfloat16": "round_bf16", "float16": "round_fp16"}


def triton_lines(program: Program, leaf_load: str, indent: str, first_leaf: str | None = None, prefix: str = "") -> list[str]:
    """Statements computing ``{prefix}x`` (fp32) for one tile: ``leaf_load.format(i=...)`` loads
    leaf i; ``first_leaf``, if given, is the expression of leaf 0 instead (a GEMM's output tile);
    ``prefix`` keeps two programs' temporaries apart in one kernel."""
    lines = [f"{indent}{prefix}l{i} = {first_leaf if i == 0 and first_leaf else leaf_load.format(i=i)}"
             for i in range(program.n_leaves)]
    for j, (op, operands, dtype, extra) in enumerate(program.steps):
        args = [f"{prefix}l{o[1]}" if isinstance(o, tuple) and o[0] == "L"
                else f"{prefix}v{o[1]}" if isinstance(o, tuple) else repr(float(o))
                for o in operands]
        expr = _impl(op, 1)(args, extra)
        if dtype in _ROUND:  # eager rounds every op's result to its dtype (to nearest even)
            expr = f"{_ROUND[dtype]}({expr})"
        lines.append(f"{indent}{prefix}v{j} = {expr}")
    lines.append(f"{indent}{prefix}x = {prefix}v{len(program.steps) - 1}")
    return lines


def reference_partials(x: torch.Tensor, slots: int, symmetric: bool) -> torch.Tensor:
    """Per-row statistics of a 2-D ``x`` in the epilogue's partials format: (rows, slots, 3),
    everything in slot 0, the other slots neutral."""
    nan = x.isnan()
    out = torch.zeros((x.shape[0], slots, 3), dtype=torch.float32, device=x.device)
    if symmetric:
        out[:, 0, 0] = torch.where(nan, 0.0, x.abs()).float().amax(1) if x.shape[1] else 0.0
        out[:, 0, 1] = nan.any(1).float()
    else:
        out[..., 0], out[..., 1] = float("inf"), float("-inf")
        if x.shape[1]:
            out[:, 0, 0] = torch.where(nan, float("inf"), x).float().amin(1)
            out[:, 0, 1] = torch.where(nan, float("-inf"), x).float().amax(1)
        out[:, 0, 2] = nan.any(1).float()
    return out
