"""What every ``fqt gpu-check`` stage shares: the partial-results recorder, the stage's device,
the datasheet peaks of the GPUs this project measures on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["Recorder", "stage_device", "peaks", "sig"]

# datasheet dense peaks (TFLOPS) and HBM bandwidth (TB/s) of the devices this project measures on
_PEAKS = {"H200": (989.0, 1979.0, 4.8), "H100": (989.0, 1979.0, 3.35)}


class Recorder:
    """A stage's partial results: a JSON object rewritten atomically after every change."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.doc: dict = {}
        self._write()

    def set(self, key: str, value) -> None:
        self.doc[key] = value
        self._write()

    def add(self, key: str, item) -> None:
        self.doc.setdefault(key, []).append(item)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.path)


def stage_device(cfg: dict) -> torch.device:
    """CUDA for a GPU run, the CPU for a dry run."""
    return torch.device("cpu" if cfg["dry_run"] else "cuda")


def peaks(device: torch.device) -> dict | None:
    """Datasheet peaks of a known GPU: {'bf16_tflops', 'int8_tflops', 'hbm_tbs'}; None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, eight, hbm) in _PEAKS.items():
        if key in name:
            return {"bf16_tflops": bf16, "int8_tflops": eight, "hbm_tbs": hbm, "source": f"{key} datasheet (dense)"}
    return None




def sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (a dry run's tiny rates stay readable)."""
    return float(f"{value:.{digits}g}")
