"""Kernels Inductor launches itself: the fqt kernel ops of a CUDA graph traced into Triton-kernel nodes.

An ``fqt::`` op left in a graph is an opaque call to Inductor: its generated code calls back
into Python for every launch (the op's dispatch, its launcher's checks and allocations, the
Triton launcher's argument binding), which costs tens of microseconds per call, and such a
step cannot be captured by CUDA graphs. This step replaces each kernel op of a graph compiled
by Inductor for CUDA with the trace of its launcher (``fqt_compiler.ops.TRITON_LAUNCHES``):
torch ops for the allocations and the small statistics reductions, and one
``triton_kernel_wrapper_functional`` node per kernel, the node Inductor compiles a
user-defined Triton kernel from. Inductor then plans those buffers with the rest of the graph
and launches the kernels from its own generated code.

What stays a Python call, with its reason in the step's report: ops with symbolic sizes (a
dynamic-shape graph is traced once for all sizes; the launchers choose tiles per size), and
custom quantizers whose kernel hook is the user's own Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from fqt_compiler.errors import PassError
from fqt_compiler.ops import TRITON_LAUNCHES, fake_quantize_kernel_op, kernel_hook
from fqt_compiler.codegen.inline import TraceCache, all_static, inline_graph_node
from fqt_compiler.lowerings import LOWERED_OPS
from fqt_compiler.codegen.kernel_access import install as install_access_cache

__all__ = ["KernelLaunches", "LaunchTraces", "LAUNCH_TRACES", "inline_kernel_launches", "kernel_nodes", "fqt_calls",
           "graph_launches", "source_launches"]

TRITON_KERNEL_NODE = "triton_kernel_wrapper_functional"


@dataclass(frozen=True)
class KernelLaunches:
    """What one compiled graph launches per call.

    ``kernels``: device kernels its code launches (Inductor's generated kernels and fqt's
    Triton kernels; on the CPU, Inductor's C++ kernels); ``fqt_kernels``: of those, fqt's
    Triton kernels that Inductor launches itself; ``library``: library calls (cuBLAS / oneDNN
    GEMMs, ``torch._int_mm``); ``python_calls``: ``fqt::`` ops called back into Python, each
    with the reason it stayed one (their own kernels are not counted above). Counted from
    Inductor's generated code where Inductor compiled the graph, else from the graph (every
    op one launch)."""

    stage: str = ""
    kernels: int = 0
    fqt_kernels: int = 0
    library: int = 0
    python_calls: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (node, reason)
    fqt_kernel_names: tuple[str, ...] = ()  # the Python names of fqt's kernels in the graph


def kernel_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The user-defined Triton kernel nodes of ``gm``."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == TRITON_KERNEL_NODE]


def fqt_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``fqt::`` op calls of ``gm`` that are opaque Python calls in Inductor's code (not
    those fqt lowers into Inductor's own loops, ``lowerings.LOWERED_OPS``)."""
    return [n for n in gm.graph.nodes if _is_fqt_call(n)]


def _is_fqt_call(n: fx.Node) -> bool:
    return (n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fqt"
            and n.target.name() not in LOWERED_OPS)


def _on_cuda(node: fx.Node) -> bool:
    flat, _ = tree_flatten((node.args, node.kwargs))
    vals = [a.meta.get("val") for a in flat if isinstance(a, fx.Node)]
    return any(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in vals)


def _blocker(node: fx.Node) -> str | None:
    """Why ``node`` must stay a Python call, or None."""
    if not all_static(node):
        return "symbolic sizes: the launcher picks tiles per size, so it runs per call"
    if node.target is fake_quantize_kernel_op and kernel_hook(node.args[1]):
        return "a custom quantizer's kernel hook (user Python)"
    return None


def _strides(t: torch.Tensor) -> tuple:
    """``t``'s strides where they address memory: a size-1 dim's stride is never used (a
    1x1 convolution's channels-last weight is the same memory as its contiguous one), and
    an empty tensor has none."""
    if t.numel() == 0:
        return ()
    return tuple(st if n > 1 else None for n, st in zip(t.shape, t.stride()))


def _same_outputs(before: object, what: str, replaced: list) -> None:
    """The traced launcher must give what the op's fake promised: the rest of the graph was
    traced on those shapes and strides."""
    vals = before if isinstance(before, (tuple, list)) else [before]
    for i, (want, got) in enumerate(zip(vals, replaced)):
        got = got.meta.get("val") if isinstance(got, fx.Node) else got
        if not isinstance(want, torch.Tensor):
            continue
        if (tuple(want.shape), _strides(want), want.dtype) != (tuple(got.shape), _strides(got), got.dtype):
            raise PassError(
                f"the traced launch of {what} output {i} is {tuple(got.shape)}/{tuple(got.stride())} "
                f"{got.dtype}; its fake declares {tuple(want.shape)}/{tuple(want.stride())} {want.dtype}"
            )


class LaunchTraces(TraceCache):
    """Traces of launchers, shared by every graph of the process: a network's forward and
    backward graphs, its compiled regions and its recompiles launch the same kernels on the
    same sizes, and tracing one launcher costs a tenth of a second or more. A trace names its
    kernels by their index in torch's kernel side table, which ``torch._dynamo.reset()``
    empties and renumbers: the traces are dropped when the table is replaced."""

    def __init__(self, size: int = 1024) -> None:
        super().__init__(size)
        self._table: object = None

    def _same_table(self) -> None:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # torch internals

        if self._table is not kernel_side_table.id_to_kernel:
            self.clear()
            self._table = kernel_side_table.id_to_kernel  # held: its id cannot be reused

    def __contains__(self, key) -> bool:
        self._same_table()
        return super().__contains__(key)

    def __setitem__(self, key, sub) -> None:
        self._same_table()
        super().__setitem__(key, sub)


LAUNCH_TRACES = LaunchTraces()


def inline_kernel_launches(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Replace every static-shape fqt kernel op on CUDA by the trace of its Triton launcher;
    returns (node, reason) for each kernel op that stays a Python call."""
    kept, traces = [], LAUNCH_TRACES
    install_access_cache()  # torch re-analyses every launch's kernel, here and in Inductor
    for node in list(gm.graph.nodes):
        fn = TRITON_LAUNCHES.get(node.target) if node.op == "call_function" else None
        if fn is None or not _on_cuda(node):
            continue
        reason = _blocker(node)
        if reason is not None:
            kept.append((node.name, reason))
            continue
        from fqt_compiler.codegen.kernels.launch import traced_launches  # Triton: only CUDA graphs get here

        before, target, name = node.meta.get("val"), node.target, node.name
        with traced_launches():
            outputs = inline_graph_node(gm, node, fn, functionalize=True, traces=traces)
        _same_outputs(before, f"{target} ({name})", outputs if isinstance(outputs, (tuple, list)) else [outputs])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return kept


_CALL_BODY = re.compile(r"^def call\(.*?(?=^def |^class |\Z)", re.S | re.M)
_PATTERNS = {
    "triton": re.compile(r"^\s+(\w+)\.run\(", re.M),  # CUDA: every Triton kernel, Inductor's and fqt's
    "cpp": re.compile(r"^\s+(cpp_fused_\w+)\(", re.M),  # CPU: Inductor's C++ kernels
    "library": re.compile(r"^\s+(?:\w+ = )?(?:extern_kernels\.\w+|torch\.ops\.aten\.\w+(?:\.\w+)?)\(", re.M),
}


def graph_launches(stage: str, gm: fx.GraphModule, kept: list[tuple[str, str]], inductor: bool) -> KernelLaunches:
    """What ``gm`` launches per call run as it stands (every op not a view a launch of its
    own), with the fqt ops left as Python calls and why (``kept``; the others: no Inductor,
    or a device without Triton kernels for Inductor to launch)."""
    reasons = dict(kept)
    default = ("compiled by Inductor, but on a device where fqt's kernels are not Triton kernels Inductor launches"
               if inductor else "no Inductor (inductor=False): the graph runs op by op")
    python = tuple((n.name, reasons.get(n.name, default)) for n in fqt_calls(gm))
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
           and not _is_fqt_call(n) and not _is_view(n)]
    nodes = kernel_nodes(gm)
    names = tuple(sorted({_kernel_name(n) for n in nodes}))
    return KernelLaunches(stage, len(ops) + len(nodes), len(nodes), 0, python, names)


def source_launches(base: KernelLaunches, source: str) -> KernelLaunches:
    """``base`` (:func:`graph_launches` before Inductor compiled the graph) recounted from the
    code Inductor generated for it."""
    match = _CALL_BODY.search(source)
    body = match.group(0) if match else source
    triton = [k.lstrip("_") for k in _PATTERNS["triton"].findall(body)]
    ours = [n.lstrip("_") for n in base.fqt_kernel_names]
    fqt = sum(1 for k in triton if any(k == n or k.startswith(n + "_") for n in ours))
    kernels = len(triton) + len(_PATTERNS["cpp"].findall(body))
    return replace(base, kernels=kernels, fqt_kernels=fqt, library=len(_PATTERNS["library"].findall(body)))


def _kernel_name(node: fx.Node) -> str:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # only graphs with such nodes get here

    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):  # autotuners wrap the jit function
        kernel = kernel.fn
    return getattr(kernel, "__name__", "")


def _is_view(node: fx.Node) -> bool:
    schema = node.target._schema
    return bool(schema.returns) and schema.returns[0].alias_info is not None and not schema.returns[0].alias_info.is_write
