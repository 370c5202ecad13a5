"""Logging and every ``FQT_*`` environment knob, declared and read in one place.

* ``FQT_LOG``: ``debug`` / ``info`` / ``warning``: level of the ``fqt_compiler`` logger (the
  per-pass log is on ``fqt_compiler.passes`` at debug level). Plain ``logging`` configuration
  of the ``fqt_compiler`` logger works too.
* ``FQT_DUMP_DIR``: a folder; every graph the backend compiles writes its full report there
  (decision table, per-pass graphs as text and runnable ``.py``, kernel sources, picture).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("fqt_compiler")

_LEVEL = os.environ.get("FQT_LOG", "").strip().upper()
if _LEVEL:
    if _LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"FQT_LOG={_LEVEL!r}: use debug, info, warning or error")
    log.setLevel(getattr(logging, _LEVEL))
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        log.addHandler(handler)


def dump_dir() -> str | None:
    """``FQT_DUMP_DIR`` if set (read when a backend is created, so tests can set it)."""
    return os.environ.get("FQT_DUMP_DIR") or None
