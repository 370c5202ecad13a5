"""Code generation: turn a rewritten, partitioned graph into something callable.

* ``Mode.REFERENCE``: run the graph eagerly with the reference ops of ``fqt_compiler.ops``
  (quantization *simulated*: dequantize, then a high-precision GEMM).
* ``Mode.KERNELS``: ``lower.lower_gemms`` replaces every realizable quantized GEMM by a
  low-bit kernel (``fqt::qmm``: Triton on CUDA, ``torch._int_mm`` on CPU); stochastic and
  nearest quantizations are inlined as the reference's aten ops so Inductor fuses them
  (``inline.py``); the rest of the graph is compiled by Inductor (``inductor=True``) or run
  eagerly.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import fx
from torch._functorch.aot_autograd import make_boxed_func

from fqt_compiler.config import FQTConfig, Fusion, Mode
from fqt_compiler.errors import OptionsError

from .ops import KERNEL_TWINS
from .inline import inline_qmm_ops, inline_quantize_ops
from .lower import LoweredGemm, lower_gemms
from .fusion import FusedQuantize, fuse_prologues, fusion_programs
from .epilogue import FusedEpilogue, fold_statistics, fuse_epilogues
from .code_layout import LayoutChoice, choose_code_layouts
from .cache_key import FQTCacheKey

__all__ = ["compile_graph", "CompiledGraph", "swap_to_kernel_ops", "LoweredGemm", "lower_gemms", "fuse_prologues", "FusedQuantize", "fuse_epilogues", "FusedEpilogue", "choose_code_layouts", "LayoutChoice"]


def swap_to_kernel_ops(gm: fx.GraphModule, include_cpu: bool = False) -> int:
    """Point quantize / BHQ nodes on CUDA (and on CPU with ``include_cpu``) at their Triton twins."""
    count = 0
    for node in gm.graph.nodes:
        twin = KERNEL_TWINS.get(node.target) if node.op == "call_function" else None
        val = node.args[0].meta.get("val") if twin is not None else None
        if twin is not None and isinstance(val, torch.Tensor) and (val.device.type == "cuda" or include_cpu):
            node.target = twin
            count += 1
    gm.recompile()
    return count


@dataclass
class CompiledGraph:
    """What ``compile_graph`` made of one partitioned graph."""

    fn: Callable  # boxed callable
    lowered: list[LoweredGemm] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # kernel name -> generated / kernel source
    fused: list = field(default_factory=list)  # FusedQuantize (prologues) and FusedEpilogue (GEMM epilogues)
    layouts: list = field(default_factory=list)  # LayoutChoice: codes written in another memory order


def _triton_sources(gm: fx.GraphModule) -> dict[str, str]:
    """Source of every fqt Triton kernel family the graph calls on CUDA (specialized by Triton
    per constexpr combination at launch)."""
    from fqt_compiler.quantizers import get_quantizer
    from fqt_compiler.specs import QuantSpec

    from .ops import bhq_inverse_kernel_op, bhq_quantize_kernel_op, fake_quantize_kernel_op, qmm_op, quantize_kernel_op

    families = {
        qmm_op: ("codegen.kernels.qmm", ["_qmm_kernel"]),
        quantize_kernel_op: ("codegen.kernels.quantize", ["_quantize_rows_kernel", "_minmax_partials_kernel"]),
        bhq_quantize_kernel_op: ("codegen.kernels.bhq", ["_group_projection_kernel"]),
        bhq_inverse_kernel_op: ("codegen.kernels.bhq", ["_group_projection_kernel", "_reflect_kernel"]),
    }
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is fake_quantize_kernel_op:
            spec = QuantSpec.from_key(node.args[1])
            kernel = get_quantizer(spec.quantizer).kernel if spec.quantizer else None
            if kernel is not None:
                try:
                    out[f"custom:{spec.quantizer}"] = inspect.getsource(kernel)
                except (OSError, TypeError):
                    out[f"custom:{spec.quantizer}"] = repr(kernel)
        fam = families.get(node.target) if node.op == "call_function" else None
        val = node.args[0].meta.get("val") if fam else None
        if fam and isinstance(val, torch.Tensor) and val.device.type == "cuda":
            module = importlib.import_module(fam[0])
            for name in fam[1]:
                out[f"triton:{name}"] = getattr(module, name).src
    return out


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: FQTConfig, name: str = "graph") -> CompiledGraph:
    """Compile ``gm`` for ``config.execution``: a boxed callable, the lowering decisions, the sources."""
    lowered: list[LoweredGemm] = []
    if config.execution is not Mode.KERNELS:
        return CompiledGraph(make_boxed_func(gm.forward), lowered)
    lowered = lower_gemms(gm)
    stage = name.rsplit("_", 1)[-1]
    fused, layouts = _fuse(gm, config)
    fused, layouts = [replace(f, stage=stage) for f in fused], [replace(c, stage=stage) for c in layouts]
    # OFF: every quantization stays a standalone kernel op (CPU: a compiled standalone quantizer)
    swap_to_kernel_ops(gm, include_cpu=config.fusion is Fusion.OFF)  # CUDA: Triton quantize / BHQ kernels
    sources = {**_triton_sources(gm), **fusion_programs(gm, stage)}
    if not config.inductor:
        return CompiledGraph(make_boxed_func(gm.forward), lowered, sources, fused, layouts)
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.fx_passes.replace_random import replace_random_passes
    from torch._inductor.virtualized import V

    inline_quantize_ops(gm)
    inline_qmm_ops(gm)
    # Inductor's compile_fx runs this before partitioning; our graphs skip that path
    fake_mode = next(n.meta["val"].fake_mode for n in gm.graph.nodes if hasattr(n.meta.get("val"), "fake_mode"))
    with V.set_fake_mode(fake_mode):
        replace_random_passes(gm)
    # A value a quantizer reads twice (its statistics pass, then its codes pass) is stored
    # once instead of recomputed per pass: on CPU recomputing e.g. GELU's erf in both
    # passes lost to the standalone quantizer at 2048^3 (0.95x), storing wins (1.04x).
    # fqt's identity in Inductor's FX-graph cache key (cache_key.py)
    key = FQTCacheKey(config, torch._inductor.config.post_grad_custom_pre_pass)
    with torch._inductor.config.patch({"realize_reads_threshold": 1, "post_grad_custom_pre_pass": key,
                                       **_inductor_mode_options(gm, config)}):
        compiled = compile_fx_inner(gm, example_inputs)
    code = getattr(compiled, "source_code", None)
    if code:
        sources[f"inductor:{name}"] = code
    return CompiledGraph(compiled, lowered, sources, fused, layouts)


def _inductor_mode_options(gm: fx.GraphModule, config: FQTConfig) -> dict:
    """Inductor's settings for torch.compile's ``mode`` (``config.inductor_mode``). fqt's
    kernels are not yet launched in a form CUDA graph capture takes: on CUDA,
    ``"reduce-overhead"`` (CUDA graphs and nothing else) is refused, and ``"max-autotune"`` keeps
    its autotuning and warns that it captures no CUDA graphs. The CPU has no CUDA graphs."""
    import warnings

    from torch._inductor import list_mode_options

    options = dict(list_mode_options(config.inductor_mode))
    if options.pop("triton.cudagraphs", False) and _on_cuda(gm):
        if not options:
            raise OptionsError(
                f"mode={config.inductor_mode!r} captures CUDA graphs, which fqt's kernels do not support yet; "
                "use the default mode or 'max-autotune-no-cudagraphs'"
            )
        warnings.warn(f"fqt: mode={config.inductor_mode!r} autotunes but captures no CUDA graphs (not supported by fqt's "
                      "kernels yet); 'max-autotune-no-cudagraphs' says so without this warning", stacklevel=2)
    return options


def _on_cuda(gm: fx.GraphModule) -> bool:
    return any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device.type == "cuda" for n in gm.graph.nodes)


def _fuse(gm: fx.GraphModule, config: FQTConfig) -> tuple[list, list]:
    """Prologue and epilogue fusion, then the codes' memory order, where the config asks for
    generated kernels (see ``Fusion``): (fused kernels, layout choices)."""
    import os

    if config.fusion is Fusion.OFF:
        return [], []
    if config.fusion is Fusion.TRITON:
        on_cpu = any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device.type == "cpu" for n in gm.graph.nodes)
        if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise OptionsError(
                "fusion='triton' runs generated Triton kernels, which need CUDA tensors (or TRITON_INTERPRET=1 "
                "on CPU, for tests); on CPU use fusion='auto', where Inductor fuses the quantizers"
            )
        fused = [*fuse_prologues(gm, include_cpu=True), *fuse_epilogues(gm, include_cpu=True), *fold_statistics(gm, include_cpu=True)]
        return fused, choose_code_layouts(gm, include_cpu=True)
    # AUTO: CUDA graphs only; prologues first, so quantizers take the chains feeding them; then
    # GEMM epilogues (their consumers, the next quantizer's statistics); the codes' memory
    # order last, once every GEMM reading them is in place
    return [*fuse_prologues(gm), *fuse_epilogues(gm), *fold_statistics(gm)], choose_code_layouts(gm)
