"""FX passes over the AOTAutograd joint graph (see README.md in this folder)."""

from .base import PassContext
from .pipeline import PIPELINE, run_passes

__all__ = ["PassContext", "PIPELINE", "run_passes"]
