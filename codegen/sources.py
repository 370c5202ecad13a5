"""The source of every kernel a compiled graph runs: what ``explain`` and the dumps show.

Gathered after the lowering and fusion steps and before Inductor inlines the quantizers, while
each fqt op is still a node of its own.
"""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import fx

from fqt_compiler.quantizers import get_quantizer
from fqt_compiler.specs import QuantSpec
from fqt_compiler.passes.graph_utils import arg
from fqt_compiler.codegen.epilogue import qmm_epilogue_op, qmm_epilogue_stats_op
from fqt_compiler.codegen.prologue import fused_quantize_op
from fqt_compiler.fusion_program import Program
from fqt_compiler.ops import bhq_inverse_kernel_op, bhq_quantize_kernel_op, fake_quantize_kernel_op, qbmm_op, qmm_op
from fqt_compiler.ops import quantize_kernel_op

__all__ = ["kernel_sources", "triton_sources", "fusion_programs"]


def triton_sources(gm: fx.GraphModule) -> dict[str, str]:
    """Source of every fqt Triton kernel family the graph calls on CUDA (specialized by Triton
    per constexpr combination at launch)."""
    families = {
        qmm_op: ("fqt_compiler.codegen.kernels.qmm", ["qmm_kernel"]),
        qbmm_op: ("fqt_compiler.codegen.kernels.qbmm", ["qbmm_kernel"]),
        quantize_kernel_op: ("fqt_compiler.codegen.kernels.quantize", ["quantize_rows_kernel", "_minmax_partials_kernel"]),
        bhq_quantize_kernel_op: ("fqt_compiler.codegen.kernels.bhq", ["_group_projection_kernel"]),
        bhq_inverse_kernel_op: ("fqt_compiler.codegen.kernels.bhq", ["_group_projection_kernel", "_reflect_kernel"]),
    }
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is fake_quantize_kernel_op:
            spec = QuantSpec.from_key(arg(node, "spec"))
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


def fusion_programs(gm: fx.GraphModule, stage: str = "") -> dict[str, str]:
    """Generated kernel source of every fused node of ``gm`` (``fused:<stage>:<node>`` ->
    source; the stage keeps the forward's and the backward's same-named nodes apart)."""
    # the kernel modules need Triton, which a CPU-only install may lack; only fused graphs get here
    from fqt_compiler.codegen.kernels.fused import generate_source
    from fqt_compiler.codegen.kernels.qmm_fused import generate_epilogue_source

    out = {}
    prefix = f"{stage}:" if stage else ""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is fused_quantize_op:
            out[f"fused:{prefix}{node.name}"] = generate_source(Program.loads(arg(node, "program")))
        elif node.op == "call_function" and node.target is qmm_epilogue_op:
            program = Program.loads(arg(node, "program"))
            out[f"fused:{prefix}{node.name}"] = generate_epilogue_source(program, arg(node, "out_dtype"))
        elif node.op == "call_function" and node.target is qmm_epilogue_stats_op:
            out[f"fused:{prefix}{node.name}"] = generate_epilogue_source(
                Program.loads(arg(node, "program")), arg(node, "out_dtype"), Program.loads(arg(node, "quant"))
            )
    return out


def kernel_sources(gm: fx.GraphModule, stage: str = "") -> dict[str, str]:
    """Every kernel source of ``gm``: the Triton kernel families and the generated fused kernels."""
    return {**triton_sources(gm), **fusion_programs(gm, stage)}
