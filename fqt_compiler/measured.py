"""Cost-model profiles measured by ``fqt gpu-check``: the machine replaces the datasheet.

A gpu-check run on a GPU times, in its ``gemm`` stage, the high-precision GEMM (bf16
``torch.mm``) and fqt's 8-bit GEMM at Linear shapes, and in its ``quantize`` stage the quantize
kernel and a device-to-device copy. :func:`fields_from_gpu_check` turns those numbers into the
fields of a ``cost.DeviceProfile`` (median throughputs at the largest shape measured, so
efficiency 1.0). After a run, gpu-check saves them under :func:`profile_dir`, one file per
device name; :func:`measured_fields` loads the one for a device, and the cost model
(``cost.profile_for``) uses it in place of the datasheet profile (a profile given with
``cost.set_profile`` still wins). Plain dicts here: the cost model builds its profile from them.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import statistics
from pathlib import Path

import torch

from .errors import OptionsError

__all__ = [
    "fields_from_gpu_check", "profile_dir", "save_measured_fields", "save_fields", "measured_fields", "profile_path",
    "cpu_name", "cpu_flags",
]

_HP_KERNEL = "torch.mm"  # gemm stage: the high-precision baseline's name ends so ("bfloat16 torch.mm")
_FQT_INT8 = "fqt int8 (triton qmm)"
_FQT_FP8 = "fqt fp8"


def profile_dir() -> Path:
    """Where measured profiles live: ``$FQT_PROFILE_DIR``, else ``~/.cache/fqt/profiles``."""
    root = os.environ.get("FQT_PROFILE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fqt" / "profiles"


def profile_path(device_name: str) -> Path:
    """The profile file of a device called ``device_name`` (as ``torch.cuda.get_device_name``)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") or "device"
    return profile_dir() / f"{slug}.json"


def _items(doc: dict, stage: str) -> list[dict]:
    results = doc.get("stages", {}).get(stage, {}).get("results", {})
    items = results.get("items") if isinstance(results, dict) else None
    if not items:
        raise OptionsError(f"the gpu-check results have no measurements from its {stage!r} stage; run `fqt gpu-check` "
                           f"with that stage on the GPU (it may have been skipped or failed: see gpu_check.md)")
    return items


def _largest(items: list[dict], key: str) -> list[dict]:
    """The items measured at the largest GEMM / tensor of the run."""
    size = max(_volume(i[key]) for i in items)
    return [i for i in items if _volume(i[key]) == size]


def _volume(dims: list[int]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def fields_from_gpu_check(source: dict | str | Path) -> dict:
    """The ``DeviceProfile`` fields measured by a gpu-check run (the parsed ``gpu_check.json``,
    or its path)."""
    doc = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    if doc.get("dry_run"):
        raise OptionsError("a gpu-check dry run (on the CPU) measures nothing about a GPU; use a run made on the GPU")
    device = doc.get("stages", {}).get("preflight", {}).get("results", {}).get("device", {})
    name = device.get("name")
    if not name:
        raise OptionsError("the gpu-check results do not name their device (no preflight stage results)")
    gemms = _largest(_items(doc, "gemm"), "gemm")

    def median_tflops(match) -> float:
        values = [i["tflops"] for i in gemms if match(i["kernel"])]
        if not values:
            raise OptionsError(f"the gpu-check gemm stage has no {match.__doc__} measurement at its largest shape")
        return statistics.median(values) * 1e12

    def hp(kernel: str) -> bool:
        """high-precision"""
        return kernel.endswith(_HP_KERNEL)

    def int8(kernel: str) -> bool:
        """fqt int8"""
        return kernel == _FQT_INT8

    quant = _largest(_items(doc, "quantize"), "shape")
    fp8 = [i for i in gemms if i["kernel"].startswith(_FQT_FP8)]
    return dict(
        name=f"{name} (measured by fqt gpu-check)",
        hp_flops=median_tflops(hp),
        lowbit_flops=median_tflops(int8),
        mem_bw=statistics.median(i["copy_gb_s"] for i in quant) * 1e9,
        quant_bw=statistics.median(i["gb_s"] for i in quant) * 1e9,
        efficiency=1.0,
        fp8_gemm=bool(fp8),
        source=f"fqt gpu-check started {doc.get('started', '?')}: median GEMM TFLOPS and quantize / copy bandwidth at "
        f"the run's largest shapes (torch {device.get('torch', '?')}, triton {device.get('triton', '?')})",
    )


def cpu_name() -> str:
    """This CPU as its measured profile is filed: the model name and the threads torch uses
    (a profile measured on 2 threads says nothing about 32)."""
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags from /proc/cpuinfo; None where that cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            found = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        found = None
    return found or platform.processor() or platform.machine() or "unknown CPU"


def save_measured_fields(doc: dict) -> Path:
    """Derive the profile of a gpu-check run and save it as its device's measured profile."""
    fields = fields_from_gpu_check(doc)
    return save_fields(doc["stages"]["preflight"]["results"]["device"]["name"], fields)


def save_fields(name: str, fields: dict) -> Path:
    """Save ``fields`` (a ``DeviceProfile``'s) as the measured profile of the device ``name``."""
    path = profile_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"device": name, "profile": fields}, indent=1))
    os.replace(tmp, path)
    return path


def measured_fields(device_name: str) -> dict | None:
    """The saved measured profile fields of ``device_name``, or None. A file that cannot be
    read as one raises: a corrupt profile must not silently fall back to the datasheet."""
    path = profile_path(device_name)
    if not path.exists():
        return None
    try:
        fields = json.loads(path.read_text())["profile"]
        if not isinstance(fields, dict) or not all(isinstance(fields.get(k), (int, float)) for k in _NUMBERS):
            raise ValueError(f"expected numbers for {', '.join(_NUMBERS)}")
        return fields
    except (ValueError, KeyError, TypeError) as exc:
        raise OptionsError(f"measured profile {path} is unreadable ({type(exc).__name__}: {exc}); delete it or re-run "
                           "`fqt gpu-check` on this GPU") from exc


_NUMBERS = ("hp_flops", "lowbit_flops", "mem_bw", "quant_bw")
