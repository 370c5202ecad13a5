"""The ``conv`` stage of ``fqt gpu-check``: a ResNet-50 training step (batch 64, 224x224) under
fqt's ``int8`` and ``fp8`` recipes against bf16 ``torch.compile`` in channels-last memory (cuDNN),
the baseline a user runs instead; every convolution GEMM on fqt's Triton kernels. Both networks
are compiled by region (stem, each bottleneck, classifier; ``ResNet50.compile_regions``): the
first two H200 runs spent minutes on one whole-network fqt graph without finishing. The GEMM
counts are those of the distinct compiled graphs: blocks that share a graph count once.

In a dry run (CPU) the network is a narrow, shallow ResNet-50 at 32x32, the baseline fp32
``aot_eager`` and fqt without Inductor: the same code paths in seconds.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import fqt_compiler as fqt

from fqt_compiler.tools.cnn_models import ResNet50
from fqt_compiler.tools.gpu_common import Recorder, sig
from fqt_compiler.tools.gpu_train import compile_baseline, compile_fqt, launch_counts, lowbit_gemms, profile_step, setup_stage
from fqt_compiler.tools.timing import interleaved_medians

__all__ = ["conv", "FULL", "DRY"]

# int8 only: the first H200 run spent its 150 s on the baseline's compile (45 s) and fqt's,
# which had not finished; fp8 is the next run's, with --stages conv alone
FULL = {"batch": 64, "size": 224, "width": 64, "blocks": (3, 4, 6, 3), "recipes": ("int8",), "reps": 10}
DRY = {"batch": 2, "size": 16, "width": 8, "blocks": (1, 1, 1, 1), "recipes": ("int8",), "reps": 2}


def _step(model, compiled, x: torch.Tensor, y: torch.Tensor, autocast: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()

    return run


def _allow_block_recompiles(blocks) -> None:
    """Regional compilation compiles the bottleneck's code once per distinct block (two per
    stage): Dynamo's per-code recompile limit (8 by default) must admit them all."""
    import torch._dynamo

    need = 2 * len(blocks) + 2
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), need))


def _timed_first(step, device: torch.device) -> float:
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# one 3x3 convolution of ResNet-50's third stage (batch, channels, size): a conv number that a
# short cap still reaches, before the whole network
LAYER, DRY_LAYER = (64, 256, 14), (2, 8, 8)


def _layer(rec: Recorder, cfg: dict, device: torch.device, autocast: bool, base_label: str) -> None:
    """One 3x3 convolution's fwd+bwd (channels-last, no bias) under ``int8`` against the baseline."""
    batch, channels, size = DRY_LAYER if cfg["dry_run"] else LAYER
    x = torch.randn(batch, channels, size, size, device=device).to(memory_format=torch.channels_last)
    dy = torch.randn(batch, channels, size, size, device=device).to(memory_format=torch.channels_last)
    runs = []
    for be in (None, fqt.backend(recipe="int8", inductor=not cfg["dry_run"])):
        torch.manual_seed(0)
        layer = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device).to(memory_format=torch.channels_last)
        compiled = compile_baseline(layer, cfg) if be is None else compile_fqt(layer, be)
        use_autocast = autocast and be is None

        def run(layer=layer, compiled=compiled, use_autocast=use_autocast):
            layer.weight.grad = None
            xg = x.detach().requires_grad_()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                out = compiled(xg)
            out.backward(dy.to(out.dtype))

        runs.append((run, _timed_first(run, device), be))
    (base, _, _), (cand, compile_s, be) = runs
    t_base, t_cand = interleaved_medians([base, cand], device, 10 if not cfg["dry_run"] else 2)
    rec.set("layer", {"conv": f"3x3, {channels} -> {channels} channels, {size}x{size}, batch {batch}", "recipe": "int8",
                      "baseline": base_label, "speedup": sig(t_base / t_cand), "baseline_ms": round(t_base * 1e3, 3),
                      "fqt_ms": round(t_cand * 1e3, 3), "fqt_compile_s": round(compile_s, 1), "lowbit_gemms": lowbit_gemms(be),
                      "fqt_launches": launch_counts(be)})


def conv(rec: Recorder, cfg: dict) -> None:
    """One convolution layer, then ResNet-50 steps: the bf16 channels-last baseline, then each
    recipe, timed interleaved."""
    device, _, _ = setup_stage(cfg)
    g = DRY if cfg["dry_run"] else FULL
    autocast = device.type == "cuda"
    base_label = ("bf16 autocast, channels-last, torch.compile (Inductor, cuDNN)" if autocast
                  else "fp32 channels-last torch.compile(backend='aot_eager') (dry run)")
    rec.set("config", {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} | {"baseline": base_label})
    _layer(rec, cfg, device, autocast, base_label)
    torch.manual_seed(0)
    x = torch.randn(g["batch"], 3, g["size"], g["size"], device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (g["batch"],), device=device)
    _allow_block_recompiles(g["blocks"])
    base_model = ResNet50(width=g["width"], blocks=g["blocks"]).to(device).to(memory_format=torch.channels_last)
    base_model.compile_regions(lambda m: compile_baseline(m, cfg))
    base = _step(base_model, base_model, x, y, autocast)
    rec.set("baseline_compile_s", round(_timed_first(base, device), 1))
    for recipe in g["recipes"]:
        torch.manual_seed(0)
        model = ResNet50(width=g["width"], blocks=g["blocks"]).to(device).to(memory_format=torch.channels_last)
        be = fqt.backend(recipe=recipe, inductor=not cfg["dry_run"])
        model.compile_regions(lambda m: compile_fqt(m, be))
        step = _step(model, model, x, y, False)
        compile_s = _timed_first(step, device)
        # recorded as soon as known: a run cut later still shows the compile and the decisions
        rec.set(f"{recipe}_compile_s", round(compile_s, 1))
        launches = launch_counts(be)
        rec.set(f"{recipe}_launches", launches)
        t_base, t_cand = interleaved_medians([base, step], device, g["reps"])
        item = {
            "recipe": recipe, "speedup": sig(t_base / t_cand), "baseline": base_label,
            "baseline_ms": round(t_base * 1e3, 3), "fqt_ms": round(t_cand * 1e3, 3), "fqt_compile_s": round(compile_s, 1),
            "lowbit_gemms": lowbit_gemms(be), "gemms": sum(len(s.gemms) for r in be.records for s in r.decisions),
            "fqt_launches": launches, "fqt_step_profile": "not profiled (the stage's cap came first)",
        }
        rec.add("items", item)
        item["fqt_step_profile"] = profile_step(step, device)
        rec.set("items", rec.doc["items"])  # rewritten with the profile
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
