"""``fqt bench --sections compile``: how long a model's first training step takes to compile.

A user meets compile time before any step time. The model is ``fqt results``' byte-level GPT
(width 64, 2 layers, context 64, batch 8); each row is one fresh process with empty Inductor,
Triton and fqt kernel caches, timing the first forward and the first backward (both compile)
under plain Inductor and under fqt's recipes, then the first step at a second context length:
torch.compile's automatic dynamic shapes compile that one on a symbolic length, the graph every
later length reuses (what a user meets at the first short last batch or a new sequence length).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from tabulate import tabulate

__all__ = ["compile_section", "first_step_times"]

_CHILD = "from fqt_compiler.tools.bench_compile import _child; _child()"


def first_step_times(backend: str, device: torch.device, width: int = 64, layers: int = 2, timeout: float = 1800) -> dict:
    """The first forward's and backward's seconds (``{"forward": s, "backward": s, "dynamic": s}``)
    of the byte-level GPT compiled by ``backend`` (``"inductor"`` or an fqt recipe), in a fresh
    process whose compile caches start empty; ``dynamic`` is the whole first step (forward and
    backward) at a second context length, compiled on a symbolic length."""
    with tempfile.TemporaryDirectory(prefix="fqt-compile-") as caches:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(caches, "triton"), FQT_KERNEL_CACHE=os.path.join(caches, "fqt"),
                   FQT_COMPILE_CHILD=json.dumps([backend, str(device), width, layers]))
        env.pop("TRITON_INTERPRET", None)  # Inductor's own Triton code cannot run under the interpreter
        done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the compile-time run of {backend!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child() -> None:
    import fqt_compiler as fqt
    from fqt_compiler.tools.results import ByteGPT

    backend, device, width, layers = json.loads(os.environ["FQT_COMPILE_CHILD"])
    device = torch.device(device)
    torch.manual_seed(0)
    model = ByteGPT(d=width, layers=layers).to(device)
    compiled = torch.compile(model, backend="inductor" if backend == "inductor" else fqt.backend(recipe=backend))

    def step(length: int) -> tuple[float, float]:
        """The seconds of one forward and of its backward at context ``length``."""
        idx = torch.randint(0, 256, (8, length), device=device)
        start = time.perf_counter()
        logits = compiled(idx)
        middle = time.perf_counter()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return middle - start, time.perf_counter() - middle

    forward, backward = step(64)
    print(json.dumps({"forward": forward, "backward": backward, "dynamic": sum(step(48))}))


def compile_section(shapes: list, recipes: list[str], device: torch.device, reps: int, dtype: torch.dtype) -> list[str]:
    """The ``compile`` section's markdown: plain Inductor, then each recipe (shapes, reps and
    dtype do not apply: one first step each)."""
    rows, base = [], None
    for backend in ["inductor", *recipes]:
        t = first_step_times(backend, device)
        total = t["forward"] + t["backward"]
        base = base if base is not None else total
        rows.append([backend if backend == "inductor" else f"fqt {backend}", f"{t['forward']:.1f}", f"{t['backward']:.1f}",
                     f"{total:.1f}", f"{total / base:.2f}x", f"{t['dynamic']:.1f}"])
    table = tabulate(rows, headers=["backend", "first forward (s)", "first backward (s)", "total (s)", "vs Inductor",
                                    "second length, fwd+bwd (s)"], tablefmt="github")
    return ["## compile\n", "The byte-level GPT of `fqt results` (width 64, 2 layers, context 64, batch 8): its first "
            "training step, each backend in a fresh process with empty compile caches; then the first step at "
            "context 48, which torch.compile compiles again on a symbolic length.\n", table, ""]
