"""Per-site forward error: how far each quantized layer's output is from high precision.

A model can train worse under a recipe because of one or two layers whose operands do not
suit their quantizer (a channel far wider than the others under a per-sample scale, say). To
find them, every forward GEMM site that is an ``nn.Linear`` or a convolution module is replayed
on the inputs it saw in one eager forward pass: its output with the site's own operand specs
(the reference quantizers, in the layouts the backend uses) against its high-precision output,
as the relative error ``||y_q - y|| / ||y||``. Each layer is measured on exact inputs, so the
number is that layer's own contribution, not the accumulated drift. Sites that are not such
modules (functional matmuls, attention) are not measured.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from .layout import Layout

from .reference import fake_quantize_ref
from .sites import SiteDecision
from .specs import GemmKind, TensorRole

__all__ = ["forward_errors"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _output_gemm(site: SiteDecision):
    return next((g for g in site.gemms if g.kind is GemmKind.OUTPUT), None)


def _measurable(site: SiteDecision, module: nn.Module | None) -> bool:
    g = _output_gemm(site)
    return g is not None and g.quantized and isinstance(module, (nn.Linear, *_CONVS))


def _replay(module: nn.Module, x: torch.Tensor, site: SiteDecision) -> torch.Tensor:
    """The module's output on ``x`` with its site's operand specs applied."""
    specs = {o.role: o.spec for o in _output_gemm(site).operands}
    act, weight = specs.get(TensorRole.ACTIVATION), specs.get(TensorRole.WEIGHT)
    is_linear = isinstance(module, nn.Linear)
    x_layout = Layout.PENULTIMATE if is_linear else Layout.DIM0  # per token / per sample rows, as the backend quantizes
    xq = fake_quantize_ref(x, act, x_layout) if act is not None else x
    wq = fake_quantize_ref(module.weight, weight, Layout.DIM0) if weight is not None else module.weight  # per output channel rows
    return F.linear(xq, wq, module.bias) if is_linear else module._conv_forward(xq, wq, module.bias)


def forward_errors(model: nn.Module, args: tuple, kwargs: dict | None, sites: list[SiteDecision]) -> dict[tuple[int, int], float]:
    """{(graph_id, site_id): relative forward error} for the measurable sites of ``sites``, from
    one eager forward of ``model`` (the caller restores its state and RNG)."""
    modules = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
    wanted = [s for s in sites if _measurable(s, modules.get(s.module_path))]
    by_path: dict[str, list[SiteDecision]] = defaultdict(list)
    for s in wanted:
        by_path[s.module_path].append(s)  # a module called k times: its k sites in graph order
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def hook(path):
        def record(mod, inputs, output):
            if isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor) and inputs[0].is_floating_point():
                calls[path].append((inputs[0].detach(), output.detach()))
        return record

    handles = [modules[p].register_forward_hook(hook(p)) for p in by_path]
    try:
        with torch.no_grad():
            model(*args, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    errors = {}
    with torch.no_grad():
        for path, path_sites in by_path.items():
            for site, (x, y) in zip(path_sites, calls[path]):
                yq = _replay(modules[path], x, site)
                errors[(site.graph_id, site.site_id)] = float(
                    (yq.double() - y.double()).norm() / y.double().norm().clamp_min(1e-300)
                )
    return errors
