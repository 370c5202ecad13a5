"""fqt's identity in Inductor's FX graph cache key.

Inductor caches compiled graphs on disk (``fx_graph_cache``), keyed by the graph, the inputs
and Inductor's configuration. The graphs fqt hands it carry most of fqt's decisions (specs
are op arguments), but not all: the implementations behind ``fqt::`` ops, a rule that leaves
a graph unchanged today, a re-registered quantizer. A post-grad pass that changes nothing and
whose ``uuid()`` is fqt's identity -- the config's :meth:`FQTConfig.uuid`, the registered
quantizers, and a hash of fqt's own source -- makes Inductor's key cover all of that, the way
Inductor asks custom passes to.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
from pathlib import Path

from torch._inductor.custom_graph_pass import CustomGraphPass

from fqt_compiler.config import FQTConfig
from fqt_compiler.quantizers import get_quantizer, registered_quantizers

__all__ = ["FQTCacheKey", "source_hash", "quantizers_identity"]


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of every source file of fqt's packages: a changed fqt never reuses old code."""
    digest = hashlib.sha256()
    # find_spec locates the package folders without importing them (this module is imported
    # while the fqt_compiler package itself is still initialising)
    for name in ("fqt_compiler", "fqt_compiler.passes", "fqt_compiler.codegen"):
        root = Path(importlib.util.find_spec(name).origin).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _callable_identity(fn) -> str:
    if fn is None:
        return "-"
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):  # built in or defined interactively: its name is all there is
        text = getattr(fn, "__qualname__", repr(fn))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def quantizers_identity() -> tuple:
    """(name, unbiased, fn source hash, kernel source hash) of every registered quantizer."""
    out = []
    for name in registered_quantizers():
        q = get_quantizer(name)
        out.append((name, q.unbiased, _callable_identity(q.fn), _callable_identity(q.kernel)))
    return tuple(out)


class FQTCacheKey(CustomGraphPass):
    """A no-op post-grad pass carrying fqt's identity (``uuid``) into Inductor's cache key;
    ``inner``, a pass the user configured there, still runs and keys the cache too."""

    def __init__(self, config: FQTConfig, inner: CustomGraphPass | None = None) -> None:
        self.key = (config.uuid(), source_hash(), quantizers_identity())
        self.inner = inner

    def __call__(self, graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self):
        inner = self.inner.uuid() if self.inner is not None and hasattr(self.inner, "uuid") else None
        return repr((self.key, inner))
