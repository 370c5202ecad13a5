"""Exceptions raised by fqt.

Every error a user can cause is an :class:`FQTError` subclass whose message names what is
wrong and how to fix it. ``SpecError`` and ``OptionsError`` also derive from ``ValueError`` so
that callers catching the standard exception keep working.
"""

from __future__ import annotations

__all__ = ["FQTError", "SpecError", "OptionsError", "UnsupportedGraphError", "PassError", "QuantizerError"]


class FQTError(Exception):
    """Base class of every exception raised by fqt."""


class SpecError(FQTError, ValueError):
    """An invalid ``QuantSpec``, ``Recipe`` or recipe name."""


class OptionsError(FQTError, ValueError):
    """An invalid backend option (unknown key, bad value)."""


class UnsupportedGraphError(FQTError):
    """A GEMM site could not be quantized and ``strict=True`` forbids skipping it."""


class PassError(FQTError):
    """A compiler pass failed or broke a graph invariant."""


class QuantizerError(FQTError, ValueError):
    """A registered custom quantizer broke its contract (wrong shape, NaN / Inf from finite input)."""
