"""Code generation: the compile steps of the pipeline and the final compile of each graph.

The steps themselves (lowering, fusion, code layouts, kernel selection, inlining) are listed
and run in order by ``fqt_compiler.pipeline``; :func:`compile_graph` is the last one:

* ``Mode.REFERENCE``: run the graph eagerly with the reference ops of ``fqt_compiler.ops``
  (quantization *simulated*: dequantize, then a high-precision GEMM).
* ``Mode.KERNELS``: the lowered graph (low-bit GEMMs ``fqt::qmm``: Triton on CUDA,
  ``torch._int_mm`` on CPU; quantizers inlined as aten ops so Inductor fuses them) is compiled
  by Inductor (``inductor=True``) or run eagerly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx
from torch._functorch.aot_autograd import make_boxed_func

from fqt_compiler.config import FQTConfig, Mode
from fqt_compiler.errors import OptionsError
from fqt_compiler.host_memory import retain_freed_host_memory
from fqt_compiler.codegen.cache_key import FQTCacheKey
from fqt_compiler.codegen.code_layout import LayoutChoice, choose_code_layouts
from fqt_compiler.codegen.epilogue import FusedEpilogue, fold_statistics, fuse_epilogues
from fqt_compiler.codegen.prologue import FusedQuantize, fuse_prologues
from fqt_compiler.codegen.lower import LoweredGemm, lower_gemms
from fqt_compiler.codegen.kernel_select import swap_to_kernel_ops
from fqt_compiler.codegen.launches import fqt_calls
from fqt_compiler.lowerings import register_lowerings

__all__ = [
    "compile_graph", "CompiledGraph", "swap_to_kernel_ops", "LoweredGemm", "lower_gemms", "fuse_prologues", "FusedQuantize",
    "fuse_epilogues", "FusedEpilogue", "fold_statistics", "choose_code_layouts", "LayoutChoice",
]


@dataclass
class CompiledGraph:
    """What the pipeline made of one partitioned graph."""

    fn: Callable  # boxed callable
    lowered: list[LoweredGemm] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # kernel name -> generated / kernel source
    fused: list = field(default_factory=list)  # FusedQuantize (prologues) and FusedEpilogue (GEMM epilogues)
    layouts: list = field(default_factory=list)  # LayoutChoice: codes written in another memory order
    launches: object = None  # launches.KernelLaunches: what one call launches


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: FQTConfig, name: str = "graph") -> CompiledGraph:
    """The callable for a graph the compile steps already ran on: Inductor's compiled code
    (kernels mode with ``inductor=True``, its generated source under ``inductor:<name>``), else
    the graph itself, run eagerly."""
    if config.execution is not Mode.KERNELS or not config.inductor:
        return CompiledGraph(make_boxed_func(gm.forward))
    if not _on_cuda(gm):
        retain_freed_host_memory()  # steps reuse their freed memory instead of faulting in fresh pages
    # Inductor is imported on the first Inductor compile, so that ``import fqt_compiler`` stays light
    from torch._inductor.compile_fx import compile_fx_inner

    register_lowerings()
    # A value a quantizer reads twice (its statistics pass, then its codes pass) is stored
    # once instead of recomputed per pass: on CPU recomputing e.g. GELU's erf in both
    # passes lost to the standalone quantizer at 2048^3 (0.95x), storing wins (1.04x).
    # Inductor stores a pointwise value whose expression, with every producer inlined, counts
    # more than max(100, realize_opcount_threshold) ops. A stochastic quantizer's element
    # expression with the pointwise chain producing its input inlined can pass 100: the rounded
    # levels then went to an fp32 buffer and were read back, one more write and read per
    # element. The generated code computes each shared part once (common-subexpression
    # elimination), so a higher cap costs compile time only.
    # fqt's identity in Inductor's FX-graph cache key (cache_key.py)
    key = FQTCacheKey(config, torch._inductor.config.post_grad_custom_pre_pass)
    with torch._inductor.config.patch({"realize_reads_threshold": 1, "realize_opcount_threshold": 400,
                                       "post_grad_custom_pre_pass": key, **_inductor_mode_options(gm, config)}):
        compiled = compile_fx_inner(gm, example_inputs)
    code = getattr(compiled, "source_code", None)
    return CompiledGraph(compiled, sources={f"inductor:{name}": code} if code else {})


def _inductor_mode_options(gm: fx.GraphModule, config: FQTConfig) -> dict:
    """Inductor's settings for torch.compile's ``mode`` (``config.inductor_mode``). CUDA graphs
    (``"reduce-overhead"``, ``"max-autotune"``) capture a CUDA graph whose fqt kernels Inductor
    launches itself (step ``inline_kernel_launches``); an ``fqt::`` op left as a Python call
    (symbolic sizes, a custom quantizer's kernel hook) cannot be captured: then
    ``"reduce-overhead"`` (CUDA graphs and nothing else) is refused, and ``"max-autotune"``
    keeps its autotuning and warns that it captures no CUDA graphs. The CPU has no CUDA graphs."""
    from torch._inductor import list_mode_options  # see compile_graph: Inductor on first use

    options = dict(list_mode_options(config.inductor_mode))
    if not _on_cuda(gm):
        options.pop("triton.cudagraphs", None)
        return options
    left = fqt_calls(gm) if options.get("triton.cudagraphs") else []
    if not left:
        return options
    options.pop("triton.cudagraphs")
    ops = ", ".join(sorted({str(n.target) for n in left}))
    if not options:
        raise OptionsError(
            f"mode={config.inductor_mode!r} captures CUDA graphs, but {len(left)} fqt op(s) of this graph stay Python "
            f"calls ({ops}: symbolic sizes or a custom quantizer's kernel hook; `fqt inspect` lists why); compile with "
            "static shapes (dynamic=False), or use the default mode or 'max-autotune-no-cudagraphs'"
        )
    warnings.warn(f"fqt: mode={config.inductor_mode!r} autotunes but captures no CUDA graphs: {len(left)} fqt op(s) stay "
                  f"Python calls ({ops}); 'max-autotune-no-cudagraphs' says so without this warning", stacklevel=2)
    return options


def _on_cuda(gm: fx.GraphModule) -> bool:
    return any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device.type == "cuda" for n in gm.graph.nodes)
