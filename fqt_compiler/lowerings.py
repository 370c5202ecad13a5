"""Inductor lowerings of fqt's own ops: how Inductor writes them into its generated loops.

``fqt::hash_uniform`` (stochastic rounding's noise) lowers to one pointwise expression of the
element's row-major index and the seed, the same integer arithmetic as ``grid.hash_uniform``
(same bits). Inductor inlines a pointwise value into each reader once per read, so the hash
written out in aten ops -- three rounds of ``h ^ (h >> 16)``, each reading ``h`` twice --
became eight copies of the first round in every quantizer's element loop: hundreds of loop-body
operations that Inductor's code generation re-reads for every kernel variant it considers. Its
common-subexpression elimination computed the copies once, so they cost compile time, not
step time. Static and symbolic sizes lower alike (a dynamic-shape compile pays no copies).

:func:`register_lowerings` is called before fqt hands a graph to Inductor; registering twice
is harmless.
"""

from __future__ import annotations

import sympy
import torch

from .grid import HASH_GOLDEN, HASH_MIX, MASK32

__all__ = ["register_lowerings", "LOWERED_OPS"]

_REGISTERED: list[bool] = []
# fqt ops (by name) Inductor writes into its own loops once registered: no Python call in its code
LOWERED_OPS = frozenset({"fqt::hash_uniform"})


def register_lowerings() -> None:
    """Register fqt's Inductor lowerings (once per process). Imports Inductor."""
    if _REGISTERED:
        return
    from torch._inductor.lowering import register_lowering

    register_lowering(torch.ops.fqt.hash_uniform.default, type_promotion_kind=None)(_lower_hash_uniform)
    _REGISTERED.append(True)


def _lower_hash_uniform(seed, shape, device):
    from torch._inductor.ir import Pointwise
    from torch._inductor.virtualized import ops

    sizes = [sympy.sympify(d) for d in shape]
    load_seed = seed.make_loader()
    seed_index = [sympy.Integer(0)] * len(seed.get_size())

    def inner_fn(index):
        def const(value):
            return ops.constant(value, torch.int64)

        s = ops.to_dtype(load_seed(seed_index), torch.int64)
        linear = _row_major_index(index, sizes, ops.mul(s, const(0)))
        h = ops.bitwise_and(ops.add(linear, ops.mul(s, const(HASH_GOLDEN))), const(MASK32))

        def xorshift(h):
            return ops.bitwise_xor(h, ops.bitwise_right_shift(h, const(16)))

        def mix(h):
            return ops.bitwise_and(ops.mul(h, const(HASH_MIX)), const(MASK32))

        h = xorshift(mix(xorshift(mix(xorshift(h)))))  # grid's rounds, in its order
        level = ops.to_dtype(ops.bitwise_right_shift(h, const(8)), torch.float32)
        return ops.mul(level, ops.constant(1.0 / 16777216.0, torch.float32))

    return Pointwise.create(device=torch.device(device), dtype=torch.float32, inner_fn=inner_fn, ranges=sizes)


def _row_major_index(index, sizes, zero):
    """The element's row-major index (the one the reference hashes), as an int64 value.

    Dimensions of constant stride fold into one index expression. A dimension whose stride is
    symbolic (a channels-last batch of symbolic image size: the channel's stride is H*W) is its
    own ``index * stride`` product of values: Inductor's CPU code builds a vector of an index
    expression element by element wherever the vectorized loop variable has a symbolic
    coefficient, while a product of an ``arange`` vector and a broadcast stride stays vectorized.
    Inductor folds arithmetic on index values back into one index expression, so each symbolic
    stride is offset by ``zero``, a value computed from a load (the seed times 0), which it
    cannot fold."""
    from torch._inductor.ir import FlexibleLayout
    from torch._inductor.virtualized import ops

    strides = FlexibleLayout.contiguous_strides(sizes)
    constant = sum((i * st for i, st in zip(index, strides) if st.is_number), sympy.Integer(0))
    linear = ops.index_expr(constant, torch.int64)
    for i, st in zip(index, strides):
        if not st.is_number:
            stride = ops.add(zero, ops.index_expr(st, torch.int64))
            linear = ops.add(linear, ops.mul(ops.index_expr(i, torch.int64), stride))
    return linear
