"""The CPU int8 GEMM provider forced for a test (``fqt_compiler.int8_gemm``): both are exact, so
tests of the CPU int8 paths run each in turn."""

from __future__ import annotations

import contextlib
import os

from fqt_compiler import int8_gemm

__all__ = ["forced_provider", "PROVIDERS"]

PROVIDERS = ["int_mm", "fp32"]


@contextlib.contextmanager
def forced_provider(provider: str):
    """The CPU int8 GEMM provider forced (``int_mm`` or ``fp32``), the measured one restored after."""
    before = os.environ.get("FQT_CPU_INT8_GEMM")
    os.environ["FQT_CPU_INT8_GEMM"] = provider
    int8_gemm.int8_gemm_provider.cache_clear()
    try:
        yield
    finally:
        if before is None:
            del os.environ["FQT_CPU_INT8_GEMM"]
        else:
            os.environ["FQT_CPU_INT8_GEMM"] = before
        int8_gemm.int8_gemm_provider.cache_clear()
