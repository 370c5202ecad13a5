"""Which pairs of operand codes a low-bit GEMM or convolution kernel takes, per device."""

from __future__ import annotations

import torch

__all__ = ["FP8_NAMES", "unsupported_codes"]

FP8_NAMES = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


def unsupported_codes(a: torch.dtype, b: torch.dtype, device: torch.device) -> str | None:
    """Why no low-bit GEMM takes codes of these dtypes on ``device`` (None: one does). int8
    pairs run everywhere; fp8 pairs, mixed e5m2 x e4m3 included (the backward GEMMs of the
    fp8 recipe), on CUDA, where sm_90's fp8 MMA takes any pair of the two formats."""
    if torch.uint8 in (a, b):
        return "uint8 codes: use format='int' (same levels, int8 storage) for an int8 GEMM"
    if a == b == torch.int8:
        return None
    if a in FP8_NAMES and b in FP8_NAMES:
        if device.type != "cuda":
            return f"no fast fp8 GEMM on {device.type}"
        # a real device without fp8 MMA (before sm_89); a graph traced for CUDA elsewhere is lowered as for sm_90
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 9):
            return f"no fp8 tensor cores on {torch.cuda.get_device_name(device)} (needs sm_89 or later)"
        return None
    return f"operand codes differ in dtype ({a} x {b}): no GEMM takes this pair"
