"""Coverage: how much of a training step's GEMM work fqt actually quantized.

A frame Dynamo does not compile (an ``nn.LSTM`` it refuses, a graph break) never reaches the
backend, so its GEMMs run eagerly and unquantized, and no decision table can list them. The
ground truth is an eager forward + backward counted by ``FlopCounterMode``
(``flops.step_flops``); against it, the GEMM FLOPs fqt's decisions quantized give the share.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch._dynamo.utils import counters

from .sites import GemmStatus, SiteDecision

__all__ = ["Coverage", "CoverageWarning", "DynamoSnapshot", "WARN_BELOW"]

WARN_BELOW = 0.9  # a share of quantized GEMM FLOPs below this warns


class CoverageWarning(UserWarning):
    """Part of a step's GEMM FLOPs ran in high precision (graph breaks, eager frames, skipped sites)."""


@dataclass(frozen=True)
class DynamoSnapshot:
    """Dynamo's frame and graph-break counters at one moment (they only grow)."""

    frames_total: int
    frames_ok: int
    breaks: dict

    @classmethod
    def take(cls) -> DynamoSnapshot:
        frames = counters["frames"]
        return cls(frames.get("total", 0), frames.get("ok", 0), dict(counters["graph_break"]))

    def since(self, before: DynamoSnapshot) -> tuple[int, int, list[tuple[str, int]]]:
        """(frames seen, frames compiled, [(graph-break reason, count)]) between two snapshots."""
        breaks = [(reason.strip().splitlines()[0], n - before.breaks.get(reason, 0)) for reason, n in self.breaks.items()
                  if n > before.breaks.get(reason, 0)]
        return self.frames_total - before.frames_total, self.frames_ok - before.frames_ok, breaks


@dataclass(frozen=True)
class Coverage:
    """Quantized GEMM FLOPs of one step against the eager count."""

    eager_flops: int  # FlopCounterMode, eager forward + backward
    quantized_flops: int  # GEMMs fqt quantized (low-bit kernel or simulated)
    lowbit_flops: int  # of those, on low-bit kernels
    frames: int = 0  # frames Dynamo saw
    frames_compiled: int = 0
    graph_breaks: list = field(default_factory=list)  # [(reason, count)]
    error: str = ""  # why the eager count failed, if it did

    @classmethod
    def of(
        cls, sites: list[SiteDecision], eager_flops: int, dynamo: tuple[int, int, list] = (0, 0, []), error: str = ""
    ) -> Coverage:
        quantized = lowbit = 0
        for site in sites:
            for g in site.gemms:
                if g.quantized:
                    quantized += g.flops
                    lowbit += g.flops if g.status is GemmStatus.LOWBIT_KERNEL else 0
        return cls(eager_flops, quantized, lowbit, *dynamo, error=error)

    @property
    def share(self) -> float | None:
        """Quantized share of the step's GEMM FLOPs (None: the step does no GEMM work)."""
        return min(1.0, self.quantized_flops / self.eager_flops) if self.eager_flops else None

    def summary(self) -> str:
        if self.error:
            return f"coverage: not measured (the eager step counted against failed: {self.error})"
        if self.share is None:
            return "coverage: the step does no GEMM work"
        text = (f"coverage: {100 * self.share:.1f}% of the step's GEMM FLOPs quantized ({self.quantized_flops / 1e9:.3g} of "
                f"{self.eager_flops / 1e9:.3g} GFLOP, eager count; {self.lowbit_flops / 1e9:.3g} on low-bit kernels)")
        if self.frames_compiled < self.frames:
            text += f"; {self.frames - self.frames_compiled} of {self.frames} frames ran eagerly"
        if self.graph_breaks:
            text += "; graph breaks: " + "; ".join(f"{reason} (x{n})" for reason, n in self.graph_breaks)
        return text

    def warn_if_low(self) -> None:
        if self.share is not None and self.share < WARN_BELOW:
            warnings.warn(
                f"fqt: only {100 * self.share:.1f}% of the step's GEMM FLOPs are quantized. {self.summary()}. GEMMs in frames "
                "Dynamo does not compile run unquantized; see the decision table for skipped sites",
                CoverageWarning, stacklevel=3,
            )
