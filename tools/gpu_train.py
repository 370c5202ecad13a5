"""The model stages of ``fqt gpu-check``: ``layer`` (one Linear layer's fwd+bwd) and ``e2e`` (a
GPT-2-small training step), each against the high-precision ``torch.compile`` baseline a user
would run instead (bf16 on CUDA). Timed as ``fqt_compiler.tools.bench`` times: CUDA events, interleaved
repetitions, medians; one profiled step counts kernel launches and host vs device time.

In a dry run (CPU) the baseline is fp32 ``torch.compile(backend="aot_eager")`` and fqt runs with
``inductor=False``: the same code paths at tiny shapes, without minutes of C++ compiles. Every
ratio in the results names its baseline.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fqt_compiler as fqt

from fqt_compiler.tools.bench import Layer
from fqt_compiler.tools.timing import interleaved_medians
from fqt_compiler.tools.results import Block
from fqt_compiler.tools.gpu_common import Recorder, sig, stage_device

__all__ = [
    "GPT", "layer", "e2e", "profile_step", "layer_variants", "launch_counts", "setup_stage", "compile_baseline", "compile_fqt",
    "lowbit_gemms",
]


def setup_stage(cfg: dict) -> tuple[torch.device, torch.dtype, str]:
    """Device, high-precision dtype, baseline label; Dynamo limits raised so that every
    variant compiles (the stage compiles one forward code object many times)."""
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    device = stage_device(cfg)
    if device.type == "cuda":
        return device, torch.bfloat16, "bf16 torch.compile (Inductor)"
    return device, torch.float32, "fp32 torch.compile(backend='aot_eager') (dry run: Inductor off)"


def compile_baseline(model: nn.Module, cfg: dict):
    """The high-precision baseline: Inductor on a GPU, ``aot_eager`` in a dry run; static
    shapes, as :func:`compile_fqt`."""
    return torch.compile(model, backend="aot_eager" if cfg["dry_run"] else "inductor", dynamic=False)


def compile_fqt(model: nn.Module, backend):
    """fqt's compile of ``model`` with static shapes: the stages compile one forward code
    object at several shapes, and Dynamo would otherwise recompile the second shape with
    symbolic sizes (``automatic_dynamic_shapes``), where fqt's launchers run per call from
    Python instead of from Inductor's code -- not what a model of one shape gets."""
    return torch.compile(model, backend=backend, dynamic=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(fn, device: torch.device) -> dict:
    """One step under ``torch.profiler``: kernels run on the device and their summed time,
    launch calls made by the host, and the host's wall time to issue the step. On the CPU:
    top-level operators and their summed time instead of kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        _sync(device)
    events = list(prof.events())
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        launches = [e for e in events if e.device_type == DeviceType.CPU and "LaunchKernel" in e.name]
        return {"device_kernels": len(kernels), "host_launch_calls": len(launches), "host_ms": round(host * 1e3, 3),
                "device_ms": round(sum(e.time_range.elapsed_us() for e in kernels) / 1e3, 3)}
    top = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    return {"top_level_ops": len(top), "host_ms": round(host * 1e3, 3),
            "op_ms": round(sum(e.time_range.elapsed_us() for e in top) / 1e3, 3)}


def launch_counts(be) -> list[dict]:
    """What each graph's compiled code launches per call (``fqt inspect``'s launch table):
    kernels, fqt's kernels among them, library calls, and fqt ops left as Python calls."""
    return [{"stage": launch.stage, "kernels": launch.kernels, "fqt_kernels": launch.fqt_kernels, "library": launch.library,
             "python_calls": [list(c) for c in launch.python_calls]} for r in be.records for launch in r.launches]


# ------------------------------------------------------------------ layer
def layer_variants(shapes: list, dry_run: bool) -> list[tuple[tuple, str, str]]:
    """(shape, recipe, fusion) in priority order: int8 fused at every shape, then fp8 fused,
    then the unfused split (``fusion="off"``) at the first shape."""
    shapes = [tuple(s) for s in (shapes[:1] if dry_run else shapes)]
    return [(s, "int8", "auto") for s in shapes] + [(s, "fp8", "auto") for s in shapes] + [(shapes[0], "int8", "off")]


def lowbit_gemms(be) -> int:
    """How many GEMMs of the compiled graphs run on low-bit kernels."""
    return sum(g.status is fqt.GemmStatus.LOWBIT_KERNEL for r in be.records for s in r.decisions for g in s.gemms)


def _layer_step(model: nn.Module, compiled, x: torch.Tensor, grad: torch.Tensor):
    def run():
        x.grad = None
        for p in model.parameters():
            p.grad = None
        compiled(x).backward(grad)

    return run


def layer(rec: Recorder, cfg: dict) -> None:
    device, dtype, base_label = setup_stage(cfg)
    reps = 3 if cfg["dry_run"] else 10
    rec.set("baseline", base_label)
    baselines: dict[tuple, tuple] = {}
    for shape, recipe, fusion in layer_variants(cfg["shapes"], cfg["dry_run"]):
        m, k, n = shape
        if shape not in baselines:
            torch.manual_seed(0)
            base = Layer(k, n).to(device=device, dtype=dtype)
            x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(m, n, device=device, dtype=dtype)
            step = _layer_step(base, compile_baseline(base, cfg), x, grad)
            t0 = time.perf_counter()
            step()
            _sync(device)
            baselines[shape] = (base, x, grad, step, time.perf_counter() - t0)
        base, x, grad, base_step, base_compile = baselines[shape]
        cand = Layer(k, n).to(device=device, dtype=dtype)
        cand.load_state_dict(base.state_dict())
        be = fqt.backend(recipe=recipe, fusion=fusion, inductor=not cfg["dry_run"])
        step = _layer_step(cand, compile_fqt(cand, be), x, grad)
        t0 = time.perf_counter()
        step()
        _sync(device)
        compile_s = time.perf_counter() - t0
        t_base, t_cand = interleaved_medians([base_step, step], device, reps)
        rec.add("items", {
            "shape": list(shape), "recipe": recipe, "fusion": fusion, "lowbit_gemms": lowbit_gemms(be),
            "speedup": sig(t_base / t_cand), "baseline": base_label, "baseline_ms": round(t_base * 1e3, 3),
            "fqt_ms": round(t_cand * 1e3, 3), "fqt_compile_s": round(compile_s, 1), "baseline_compile_s": round(base_compile, 1),
            "fqt_step_profile": profile_step(step, device), "baseline_step_profile": profile_step(base_step, device),
            "fqt_launches": launch_counts(be),
        })


# ------------------------------------------------------------------ e2e
class _Block(Block):
    """``results.Block`` with PyTorch's fused causal attention, as GPT-2 implementations use it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class _Head(nn.Module):
    """Final LayerNorm and the language-model head, tied to the token embedding."""

    def __init__(self, d: int, tok: nn.Embedding) -> None:
        super().__init__()
        self.ln, self.tok = nn.LayerNorm(d), tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x) @ self.tok.weight.t()


class GPT(nn.Module):
    """GPT-2 (pre-norm blocks, learned positions, tied embedding / head, tanh GELU)."""

    def __init__(self, vocab: int, context: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.head = _Head(d, self.tok)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def compile_regions(self, compile_fn) -> None:
        """Regional compilation: every block and the head through ``compile_fn``. The blocks
        share one code object, so one graph is compiled for all of them (minutes less on a
        fresh machine than one whole-model graph); every GEMM is inside a compiled region."""
        for i, block in enumerate(self.blocks):
            self.blocks[i] = compile_fn(block)
        self.head = compile_fn(self.head)


GPT2_SMALL = {"vocab": 50304, "context": 1024, "d": 768, "layers": 12, "heads": 12, "batch": 8, "steps": 20}
DRY_GPT = {"vocab": 512, "context": 32, "d": 64, "layers": 2, "heads": 4, "batch": 4, "steps": 4}


def _tokens(device: torch.device) -> torch.Tensor:
    """The bytes of Python's own documentation (``pydoc_data.topics``), as token ids."""
    import pydoc_data.topics as topics

    text = "".join(topics.topics[k] for k in sorted(topics.topics)).encode()
    return torch.tensor(list(text), dtype=torch.long, device=device)


def _train(model: nn.Module, data: torch.Tensor, g: dict, device: torch.device, rec: Recorder, label: str):
    """``g["steps"]`` AdamW steps on batches drawn from ``data``; returns the run's summary and
    a function that runs one more step (on the last batch), for the profile."""
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    gen = torch.Generator(device="cpu").manual_seed(1234)  # the same batches for every run
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(chunk: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, g["vocab"]), chunk[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(g["steps"]):
        starts = torch.randint(0, data.numel() - g["context"] - 1, (g["batch"],), generator=gen).to(device)
        chunk = data[starts[:, None] + torch.arange(g["context"] + 1, device=device)]
        t0 = time.perf_counter()
        losses.append(step(chunk).item())  # synchronizes
        times.append(time.perf_counter() - t0)
        rec.set(f"{label} progress", {"steps_done": len(losses), "losses": [round(v, 4) for v in losses]})
    steady = times[min(3, len(times) - 1):]
    out = {"compile_and_first_step_s": round(times[0], 1), "median_step_ms": round(statistics.median(steady) * 1e3, 2),
           "tokens_per_s": round(g["batch"] * g["context"] / statistics.median(steady), 1),
           "losses": [round(v, 4) for v in losses]}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out, lambda: step(chunk)


def e2e(rec: Recorder, cfg: dict) -> None:
    """GPT-2 small (12 layers, width 768, vocab 50304, T = 1024, batch 8) trained 20 steps from
    one initialization on the same batches, bf16 ``torch.compile`` then fqt ``int8``."""
    device, _, base_label = setup_stage(cfg)
    g = DRY_GPT if cfg["dry_run"] else GPT2_SMALL
    data = _tokens(device)
    rec.set("config", {**g, "data": "bytes of pydoc_data.topics", "optimizer": "AdamW lr 6e-4, wd 0.1",
                       "compilation": "regional: every block and the head (one graph shared by the blocks)",
                       "precision": "bf16 autocast (both runs)" if device.type == "cuda" else "fp32"})
    runs, profiles = {}, {}
    for label in ("baseline", "fqt int8"):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = GPT(g["vocab"], g["context"], g["d"], g["layers"], g["heads"]).to(device)
        be = None if label == "baseline" else fqt.backend(recipe="int8", inductor=not cfg["dry_run"])
        model.compile_regions((lambda m: compile_baseline(m, cfg)) if be is None else (lambda m: compile_fqt(m, be)))
        runs[label], one_step = _train(model, data, g, device, rec, label)
        if be is not None:
            runs[label]["lowbit_gemms"] = lowbit_gemms(be)
            runs[label]["launches"] = launch_counts(be)
        rec.set(label, runs[label])
        profiles[label] = profile_step(one_step, device)  # after the numbers above are safe
        rec.set("step profiles", profiles)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    b, f = runs["baseline"], runs["fqt int8"]
    rec.set("comparison", {
        "baseline": base_label,
        "tokens_per_s_ratio": sig(f["tokens_per_s"] / b["tokens_per_s"]),
        "final_loss_rel_diff": round((f["losses"][-1] - b["losses"][-1]) / b["losses"][-1], 4),
        **({"peak_memory_ratio": round(f["peak_memory_gib"] / b["peak_memory_gib"], 3)} if "peak_memory_gib" in b else {}),
    })
