"""Host memory a CPU training step reuses instead of taking fresh from the kernel every step.

A step allocates and frees the same large tensors every time (activations, codes, gradients,
the int8 kernels' workspaces). glibc's malloc returns freed memory at the top of its heap to
the kernel once more than its trim threshold is free there (and serves the largest blocks
straight from ``mmap``), so the next step takes it back page by page: a CPU step of fqt, or of
fp32 ``torch.compile`` beside it, took 12k-16k minor page faults (50-60 MiB of zeroed pages)
in most steps, a third of a convolution layer's step time. CUDA has PyTorch's caching
allocator for this; the CPU has none.

:func:`retain_freed_host_memory` (run once, at fqt's first CPU compile) sets malloc's trim
threshold to the largest value it takes and its mmap threshold to the largest block the heap
serves (32 MiB on 64-bit glibc), so freed memory stays mapped for the next step, as a caching
allocator keeps it: the process's resident memory stays at its peak. It is process-wide, so a
baseline timed in the same process gets it too. It does nothing where malloc is not glibc's,
where the user configured malloc (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, or a
``malloc`` tunable in ``GLIBC_TUNABLES``), or with ``FQT_RETAIN_HOST_MEMORY=0``; what it did is
logged on the ``fqt_compiler`` logger and returned.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["retain_freed_host_memory", "OPT_OUT"]

log = logging.getLogger("fqt_compiler")

OPT_OUT = "FQT_RETAIN_HOST_MEMORY"  # "0": leave malloc as it is

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD_MAX = 2**31 - 1  # mallopt takes an int

_applied: str | None = None


def retain_freed_host_memory() -> str:
    """Keep freed host memory mapped for reuse (see the module's text). Idempotent; returns
    what was done: ``"retained"``, or why not (``"opted out"``, ``"user malloc settings"``,
    ``"not glibc"``, ``"mallopt refused"``)."""
    global _applied
    if _applied is None:
        _applied = _apply()
        log.info("fqt: host memory: %s", _applied)
    return _applied


def _apply() -> str:
    if os.environ.get(OPT_OUT, "1") == "0":
        return "opted out"
    user = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
    if any(k in os.environ for k in user) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "user malloc settings"
    if not sys.platform.startswith("linux"):
        return "not glibc"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl and others have no such symbol
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # the mmap threshold first: setting either turns glibc's dynamic thresholds off, which
    # would otherwise lower the trim threshold again to twice the mmap threshold
    if not (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_MAX)):
        return "mallopt refused"
    return "retained"
