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
from fqt_compiler.tools.ptx import rows_ptx

codes = {0: "*i8", 1: "*fp8e4nv", 2: "*fp8e5"}
for scheme, fp8, stochastic, transform in itertools.product((0, 1, 2), (0, 1, 2), (False, True), (False, True)):
    if fp8 and scheme or transform and (fp8 or scheme):  # fp8 grids are symmetric; BHQ quantizes int codes
        continue
    ptx = rows_ptx(4, 256, True, 4, x_type="*fp32", codes_type=codes[fp8], SCHEME=scheme, FP8=fp8, STOCHASTIC=stochastic,
                   QMAX=448.0 if fp8 == 1 else 57344.0 if fp8 == 2 else 127.0, FP8_MANT=3 if fp8 == 1 else 2,
                   FP8_EMIN=-6 if fp8 == 1 else -14, TRANSFORM=transform)
    approx = sorted(set(re.findall(r"\b(?:div\.(?:full|approx)[a-z0-9.]*|rcp\.approx[a-z0-9.]*)", ptx)))
    print(f"scheme={scheme} fp8={fp8} stochastic={stochastic} transform={transform}: {approx}")
# channels-last rows: the random stream's index mapped back to the natural order
ptx = rows_ptx(4, 256, True, 4, x_type="*fp32", SCHEME=1, PERMUTED=True)
print("permuted:", sorted(set(re.findall(r"\b(?:div\.(?:full|approx)[a-z0-9.]*|rcp\.approx[a-z0-9.]*)", ptx))))
"""


@pytest.mark.slow
def test_quantize_kernels_divide_with_ieee_rounding_on_sm90():
    lines = compile_without_interpreter(_SCRIPT).strip().splitlines()
    assert len(lines) == 13, lines  # int codes: 3 schemes x 2 roundings, BHQ 2; fp8: 2 formats x 2 roundings; permuted
    approximate = [line for line in lines if not line.endswith(": []")]
    assert not approximate, approximate
