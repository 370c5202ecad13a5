"""Every division in the quantize kernels is IEEE-rounded on a GPU.

Triton compiles fp32 ``a / b`` for CUDA to ``div.full.f32``, an approximation (up to 2 ulp) that
the interpreter does not reproduce, so a kernel using it can pass every interpreter test and
still differ from its reference on a GPU. The kernels divide with ``tl.math.div_rn`` or
multiply by an exact power-of-two reciprocal; this reads the sm_90 PTX of every quantizer
variant (scheme, fp8 format, rounding, BHQ's transform) for an approximate division.
"""

from __future__ import annotations

import pytest

from tests.helpers.sm90 import compile_without_interpreter

_SCRIPT = r"""
import itertools, re
import triton
from triton.backends.compiler import GPUTarget
from fqt_compiler.codegen.kernels.quantize import quantize_rows_kernel

names = ["x_ptr", "codes_ptr", "scale_ptr", "zp_ptr", "offset_ptr", "stats_ptr", "seed_ptr", "group_ptr", "u_ptr",
         "s_ptr", "proj_ptr", "R", "C", "stride_xr", "stride_xc", "stride_cr", "stride_cc", "stride_pg"]
codes = {0: "*i8", 1: "*fp8e4nv", 2: "*fp8e5"}
for scheme, fp8, stochastic, transform in itertools.product((0, 1, 2), (0, 1, 2), (False, True), (False, True)):
    if fp8 and scheme or transform and (fp8 or scheme):  # fp8 grids are symmetric; BHQ quantizes int codes
        continue
    types = ["*fp32", codes[fp8], "*fp32", "*fp32", "*fp32", "*fp32", "*i64", "*i64", "*fp32", "*fp32", "*fp32"] + ["i32"] * 7
    const = dict(SCHEME=scheme, FP8=fp8, STOCHASTIC=stochastic, STATS_GIVEN=False,
                 QMAX=448.0 if fp8 == 1 else 57344.0 if fp8 == 2 else 127.0, LEVELS=255, CODE_OFFSET=0,
                 FP8_MANT=3 if fp8 == 1 else 2, FP8_EMIN=-6 if fp8 == 1 else -14, TRANSFORM=transform,
                 ONE_PASS=True, BLOCK_R=4, BLOCK_C=256)
    sig = {**dict(zip(names, types)), **{k: "constexpr" for k in const}}
    src = triton.compiler.ASTSource(fn=quantize_rows_kernel, signature=sig, constexprs=const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
    approx = sorted(set(re.findall(r"\b(?:div\.(?:full|approx)[a-z0-9.]*|rcp\.approx[a-z0-9.]*)", ptx)))
    print(f"scheme={scheme} fp8={fp8} stochastic={stochastic} transform={transform}: {approx}")
"""


@pytest.mark.slow
def test_quantize_kernels_divide_with_ieee_rounding_on_sm90():
    lines = compile_without_interpreter(_SCRIPT).strip().splitlines()
    assert len(lines) == 12, lines  # int codes: 3 schemes x 2 roundings, BHQ 2; fp8: 2 formats x 2 roundings
    approximate = [line for line in lines if not line.endswith(": []")]
    assert not approximate, approximate
