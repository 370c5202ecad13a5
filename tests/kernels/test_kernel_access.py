"""torch's analysis of which tensors a Triton kernel writes runs once per fqt kernel variant
(``codegen.kernel_access``), not once per launch: the key holds the constexprs, the argument
types and the one integer specialization that can fold a branch, never the runtime sizes; a
kernel that is not fqt's is not cached."""

from __future__ import annotations

import json

from tests.helpers.sm90 import compile_without_interpreter

_SCRIPT = r"""
import json
import torch
import triton
from torch._higher_order_ops import triton_kernel_wrap as wrap
from fqt_compiler.codegen import kernel_access
from fqt_compiler.codegen.kernels.quantize import quantize_rows_kernel

calls = []
real = wrap.identify_accessed_tensors if hasattr(wrap, "identify_accessed_tensors") else wrap.identify_mutated_tensors
name = real.__name__
def analysis(kernel, kwargs, *rest):
    calls.append(dict(kwargs))
    return ["codes_ptr"]
setattr(wrap, name, analysis)
kernel_access.install()
kernel_access.install()  # idempotent: one cache layer
cached = getattr(wrap, name)

def kwargs(R, C, **const):
    base = dict(SCHEME=0, FP8=0, STOCHASTIC=False, STATS_GIVEN=False, QMAX=127.0, LEVELS=255, CODE_OFFSET=0, FP8_MANT=3,
                FP8_EMIN=-6, TRANSFORM=False, ONE_PASS=True, BLOCK_R=4, BLOCK_C=1024)
    x = torch.empty(R, C)
    return dict(x_ptr=x, codes_ptr=torch.empty(R, C, dtype=torch.int8), R=R, C=C, stride_xr=C, **{**base, **const})

outs = []
for R, C, const in [(64, 768, {}), (128, 3072, {}), (96, 512, {}), (64, 768, {"STOCHASTIC": True}), (1, 768, {}),
                    (64, 768, {"BLOCK_C": 2048})]:
    outs.append(cached(quantize_rows_kernel, kwargs(R, C, **const), {}))
import sympy
outs.append(cached(quantize_rows_kernel, {**kwargs(2, 768), "R": sympy.Integer(1)}, {}))  # Inductor's R == 1
first = kernel_access.cache_info()
outs[0].append("changed by its caller")

from triton.language.standard import cdiv as other_kernel  # a @triton.jit function that is not fqt's

for n in (16, 32):
    cached(other_kernel, {"x": n, "div": 16}, {})
print(json.dumps({"calls": len(calls), "first": first, "after": kernel_access.cache_info(),
                  "again": cached(quantize_rows_kernel, kwargs(64, 768), {}),
                  "once": getattr(wrap, name).__wrapped__ is analysis}))
"""


def test_kernel_access_analysis_runs_once_per_kernel_variant():
    out = json.loads(compile_without_interpreter(_SCRIPT).strip().splitlines()[-1])
    # sizes 64x768, 128x3072, 96x512 share one analysis; a stochastic variant, R == 1 (a
    # constant to Triton) and another BLOCK_C are their own; the user's kernel runs twice, uncached
    assert out["first"] == {"hits": 3, "misses": 4, "entries": 4}  # sympy's 1 is the int 1
    assert out["calls"] == 4 + 2
    assert out["after"] == out["first"]
    assert out["again"] == ["codes_ptr"]  # a caller changing its result does not change the cache's
    assert out["once"]
