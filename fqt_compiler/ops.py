"""The ``fqt`` custom ops inserted into graphs, with fake (meta) implementations.

* ``fqt::quantize(x, spec, layout) -> (codes, scale, zero_point, offset)``: round-to-nearest
  quantization to low-bit codes. The passes follow it with plain aten pointwise ops for the
  dequantization (``(codes - zero_point) * scale + offset``), so the min-cut partitioner can
  save the low-bit codes for backward, and the codegen stage can fold the dequantization into
  a low-bit GEMM's epilogue.
* ``fqt::quantize_stochastic``: the same with stochastic rounding. Tagged
  ``nondeterministic_seeded``: it draws from torch's generator, so it is never recomputed,
  deduplicated or CSE'd (each draw must stay independent).
* ``fqt::bhq_quantize(x, spec, layout) -> (codes, scale, zero_point, offset, group, u, s)``:
  the block Householder quantizer: per-row codes of T x plus the O(N) description of T; and
  ``fqt::bhq_inverse(y, group, u, s, layout)``: T^-1 on the rows of the dequantized value. A
  GEMM on BHQ codes applies T^-1 to its output rows instead (T^-1 commutes with the GEMM).
* ``fqt::fake_quantize(x, spec, layout) -> x_hat``: quantize-dequantize in one op, for block
  scales and custom quantizers (no codes-plus-affine-scales form). Also tagged.
* ``fqt::hash_uniform(seed, shape, device)``: stochastic rounding's noise (``grid.hash_uniform``),
  one op so that Inductor lowers it as one expression (``lowerings.py``).

``spec`` is :meth:`QuantSpec.key` text and ``layout`` a :class:`Layout` value; their
implementations are the reference (``reference.py``).

The compile steps put the ops of lowered graphs (``execution="kernels"``) in their place:

* ``fqt::qmm``: the low-bit GEMM with the dequantization fused in the epilogue. CUDA: the
  Triton kernel of ``codegen/kernels/qmm.py``. CPU: ``torch._int_mm`` (VNNI int8, exact int32
  accumulation) plus the same epilogue as ``reference.qmm_ref`` (bit-identical to it); fp8 on
  CPU runs the reference (there is no fast fp8 GEMM on this CPU; the decision table says so).
* ``fqt::qbmm``: the batched low-bit GEMM (attention's ``bmm``), statistics per batch entry and
  row / column. CUDA: ``codegen/kernels/qbmm.py``. CPU: ``int8_gemm.int8_bmm`` (the exact int32
  sums) plus the epilogue of ``reference.qbmm_ref`` (``cpu_gemm.qbmm_cpu``).
* ``fqt::quantize_kernel``, ``fqt::bhq_quantize_kernel``, ``fqt::bhq_inverse_kernel``,
  ``fqt::fake_quantize_kernel``: the Triton quantize / fused BHQ kernels on CUDA (and under
  Triton's interpreter), elsewhere a compiled standalone reference; twins of the ops above.
* ``fqt::fused_quantize``: a quantizer with the pointwise chain producing its input (a
  ``Program``) in one generated kernel; elsewhere the chain op by op, then the reference.
* ``fqt::qmm_epilogue`` / ``fqt::qmm_epilogue_stats``: ``fqt::qmm`` with the pointwise ops
  consuming its output (and the next quantizer's statistics) in one generated kernel;
  elsewhere the GEMM, then the chain op by op.

``fqt::qconv``: a low-bit convolution GEMM with its epilogue (CUDA: Triton implicit-GEMM kernels;
CPU: ``fqt::conv_codes``, oneDNN's int8 convolution or ``torch._int_mm``, then the epilogue).

``fqt::monitor_codes`` / ``monitor_fake`` / ``monitor_error`` / ``monitor_gradient``: the probes of a
monitored graph (``fqt_compiler.monitor``), a float64 vector each (bodies in ``monitor_stats.py``).

Each kernel op's Triton path is a plain function of the op's arguments (``qmm_triton``,
``quantize_triton``...; the table :data:`TRITON_LAUNCHES`): the op's body calls it eagerly, and
on graphs Inductor compiles for CUDA the ``inline_kernel_launches`` step traces it, so that
Inductor launches the kernels itself (``codegen/launches.py``).

Every op is declared here, with its fake. A kernel op imports its Triton kernel module
(``codegen/kernels``) inside its body, on first launch: importing the package stays fast, the
reference paths run where Triton is absent, and a device check stays inside the body because
Triton takes CUDA tensors and, under its interpreter, CPU tensors, which no device registration
can tell apart.
"""

from __future__ import annotations

import os

import torch

from .errors import SpecError
from .bhq import bhq_inverse_ref, bhq_quantize_ref
from .fusion_program import Program, reference_partials, run_reference
from .grid import QOperand, hash_uniform_ref
from .cpu_gemm import qbmm_cpu, qmm_cpu
from .conv import ConvGeometry, out_memory_format, qconv_ref
from .conv_paths import CONV_KINDS, conv_codes, conv_codes_layout, qconv_cpu_of_op_args, qconv_triton
from .layout import Layout, from_natural_2d, natural_2d, natural_2d_shape, scale_shape
from .monitor_stats import ERROR_FIELDS, GRADIENT_FIELDS, QUANTIZER_FIELDS, error_stats, fake_quantizer_stats, gradient_stats
from .monitor_stats import quantizer_stats
from .memory_order import CodeLayout, alloc_codes, alloc_output, empty_in_input_layout, in_input_layout
from .quantizers import get_quantizer, run_custom
from .standalone import standalone_cpu
from .reference import check_qbmm, observe_quantizer_input, fake_quantize_ref, quantize_ref
from .specs import Granularity, QuantSpec, Transform

__all__ = [
    "quantize_op", "quantize_stochastic_op", "fake_quantize_op", "bhq_quantize_op", "bhq_inverse_op", "hash_uniform_op",
    "needs_fake_quantize", "quantize_fake", "QUANTIZE_OPS",
    "qmm_op", "quantize_kernel_op", "bhq_quantize_kernel_op", "bhq_inverse_kernel_op", "fake_quantize_kernel_op",
    "fused_quantize_op", "qmm_epilogue_op", "qmm_epilogue_stats_op", "qmm_cpu", "triton_here", "reference_partials",
    "TRITON_LAUNCHES", "kernel_hook", "qmm_triton", "quantize_triton", "bhq_quantize_triton", "bhq_inverse_triton",
    "fake_quantize_inline", "fused_quantize_triton", "qmm_epilogue_triton", "qmm_epilogue_stats_triton",
    "monitor_codes_op", "monitor_fake_op", "monitor_error_op", "monitor_gradient_op",
    "CONV_KINDS", "qconv_op", "conv_codes_op", "qconv_triton", "qbmm_op", "qbmm_triton", "qbmm_cpu",
]


def needs_fake_quantize(spec: QuantSpec) -> bool:
    """Specs without a codes-plus-affine-scales form: block scales and custom quantizers go
    through ``fqt::fake_quantize``."""
    return spec.granularity is Granularity.BLOCK or spec.quantizer is not None


def quantize_fake(x: torch.Tensor, spec: str, layout: int):
    """Fake implementation shared by every op returning (codes, scale, zero_point, offset)."""
    parsed = QuantSpec.from_key(spec)
    s_shape = scale_shape(x.shape, parsed.granularity, Layout(layout))
    sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    codes = empty_in_input_layout(x, parsed.code_dtype)
    return codes, x.new_empty(s_shape, dtype=sdt), x.new_empty(s_shape, dtype=sdt), x.new_empty(s_shape, dtype=sdt)


def _run_quantize(x: torch.Tensor, spec: str, layout: int, stochastic: bool):
    observe_quantizer_input(x, spec, layout)
    parsed = QuantSpec.from_key(spec)
    if parsed.is_stochastic != stochastic:
        op = "quantize_stochastic" if parsed.is_stochastic else "quantize"
        raise SpecError(f"spec {spec!r} has rounding={parsed.rounding.value}; use fqt::{op}")
    codes, scale, zp, offset = quantize_ref(x, parsed, Layout(layout))
    # custom ops may not return views or aliases of each other: materialise the broadcasts
    return (
        in_input_layout(x, codes), scale.contiguous().clone(), zp.contiguous().clone(), offset.contiguous().clone()
    )


@torch.library.custom_op("fqt::quantize", mutates_args=())
def _quantize(x: torch.Tensor, spec: str, layout: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_quantize(x, spec, layout, stochastic=False)


@torch.library.custom_op("fqt::quantize_stochastic", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _quantize_stochastic(
    x: torch.Tensor, spec: str, layout: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_quantize(x, spec, layout, stochastic=True)


_quantize.register_fake(quantize_fake)
_quantize_stochastic.register_fake(quantize_fake)


@torch.library.custom_op("fqt::hash_uniform", mutates_args=())
def _hash_uniform(seed: torch.Tensor, shape: list[int], device: torch.device) -> torch.Tensor:
    return hash_uniform_ref(seed, shape, device)


_hash_uniform.register_fake(lambda seed, shape, device: torch.empty(shape, dtype=torch.float32, device=device))


@torch.library.custom_op("fqt::fake_quantize", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _fake_quantize(x: torch.Tensor, spec: str, layout: int) -> torch.Tensor:
    observe_quantizer_input(x, spec, layout)
    # contiguous whatever x's memory order (channels-last, permuted, LAST layouts): the fake
    # declares exactly these strides, and Inductor checks them
    return in_input_layout(x, fake_quantize_ref(x, QuantSpec.from_key(spec), Layout(layout)).contiguous())


@_fake_quantize.register_fake
def _fake_quantize_fake(x: torch.Tensor, spec: str, layout: int) -> torch.Tensor:
    return empty_in_input_layout(x, x.dtype)


@torch.library.custom_op("fqt::bhq_quantize", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _bhq_quantize(
    x: torch.Tensor, spec: str, layout: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    observe_quantizer_input(x, spec, layout)
    parsed = QuantSpec.from_key(spec)
    if parsed.transform is not Transform.BLOCK_HOUSEHOLDER:
        raise SpecError(f"fqt::bhq_quantize needs a spec with transform='bhq', got {spec!r}")
    out = bhq_quantize_ref(x, parsed, Layout(layout))
    return (in_input_layout(x, out[0].contiguous()), *(t.contiguous().clone() for t in out[1:]))


@_bhq_quantize.register_fake
def _bhq_quantize_fake(x: torch.Tensor, spec: str, layout: int):
    codes, scale, zp, offset = quantize_fake(x, spec, layout)
    n = natural_2d_shape(x.shape, Layout(layout))[0]
    sdt = scale.dtype
    return (
        codes, scale, zp, offset, x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=sdt), x.new_empty((n,), dtype=sdt)
    )


@torch.library.custom_op("fqt::bhq_inverse", mutates_args=())
def _bhq_inverse(y: torch.Tensor, group: torch.Tensor, u: torch.Tensor, s: torch.Tensor, layout: int) -> torch.Tensor:
    return in_input_layout(y, bhq_inverse_ref(y, group, u, s, Layout(layout)).contiguous())  # the strides its fake declares


@_bhq_inverse.register_fake
def _bhq_inverse_fake(y, group, u, s, layout):
    return empty_in_input_layout(y, y.dtype)


quantize_op = torch.ops.fqt.quantize.default
quantize_stochastic_op = torch.ops.fqt.quantize_stochastic.default
fake_quantize_op = torch.ops.fqt.fake_quantize.default
bhq_quantize_op = torch.ops.fqt.bhq_quantize.default
bhq_inverse_op = torch.ops.fqt.bhq_inverse.default
hash_uniform_op = torch.ops.fqt.hash_uniform.default
QUANTIZE_OPS = (quantize_op, quantize_stochastic_op)


# ---------------------------------------------------------------- ops of lowered graphs
@torch.library.custom_op("fqt::qmm", mutates_args=())
def _qmm(
    a: torch.Tensor,
    sa: torch.Tensor,
    za: torch.Tensor | None,
    oa: torch.Tensor | None,
    b: torch.Tensor,
    sb: torch.Tensor,
    zb: torch.Tensor | None,
    ob: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if a.device.type == "cuda":
        return qmm_triton(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype)
    return qmm_cpu(QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob), bias, out_dtype)


def qmm_triton(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype):
    """``fqt::qmm``'s Triton launch on its flat arguments."""
    from fqt_compiler.codegen.kernels.qmm import qmm  # Triton: imported on first launch

    return qmm(QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob), bias, out_dtype)


@_qmm.register_fake
def _qmm_fake(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@torch.library.custom_op("fqt::qbmm", mutates_args=())
def _qbmm(a: torch.Tensor, sa: torch.Tensor, za: torch.Tensor | None, oa: torch.Tensor | None, b: torch.Tensor,
          sb: torch.Tensor, zb: torch.Tensor | None, ob: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The batched low-bit GEMM (attention's ``bmm``): see ``reference.qbmm_ref``."""
    qa, qb = QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob)
    check_qbmm(qa, qb)
    if a.device.type == "cuda":
        return qbmm_triton(a, sa, za, oa, b, sb, zb, ob, out_dtype)
    return qbmm_cpu(qa, qb, out_dtype)


def qbmm_triton(a, sa, za, oa, b, sb, zb, ob, out_dtype):
    """``fqt::qbmm``'s Triton launch on its flat arguments."""
    from fqt_compiler.codegen.kernels.qbmm import qbmm  # Triton: imported on first launch

    return qbmm(QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob), out_dtype)


_qbmm.register_fake(lambda a, sa, za, oa, b, sb, zb, ob, out_dtype: a.new_empty((a.shape[0], a.shape[1], b.shape[2]),
                                                                                 dtype=out_dtype))


def triton_here(x: torch.Tensor) -> bool:
    """Triton runs on CUDA, and on CPU tensors under Triton's interpreter (tests)."""
    return x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("fqt::quantize_kernel", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _quantize_kernel(x: torch.Tensor, spec: str, layout: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    parsed = QuantSpec.from_key(spec)
    if triton_here(x) and x.dtype != torch.float64:
        return quantize_triton(x, spec, layout)
    if x.device.type == "cpu" and x.dtype != torch.float64:
        out = standalone_cpu(parsed, Layout(layout), example=x)(x)
    else:
        out = quantize_ref(x, parsed, Layout(layout))
    # custom ops may not return aliases: the broadcast statistics are materialised
    return (in_input_layout(x, out[0].contiguous()), *(t.contiguous().clone() for t in out[1:]))


def quantize_triton(x: torch.Tensor, spec: str, layout: int):
    """``fqt::quantize_kernel``'s Triton launch: the codes in the fake's memory order, each
    statistic a buffer of its own (nothing to clone)."""
    from fqt_compiler.codegen.kernels.quantize import quantize  # Triton: imported on first launch

    out = quantize(x, QuantSpec.from_key(spec), Layout(layout))
    # codes a channels-last input was quantized into are already in its memory order
    return (in_input_layout(x, out[0]), *(t.contiguous() for t in out[1:]))


_quantize_kernel.register_fake(quantize_fake)


@torch.library.custom_op("fqt::bhq_quantize_kernel", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _bhq_quantize_kernel(
    x: torch.Tensor, spec: str, layout: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    parsed = QuantSpec.from_key(spec)
    if triton_here(x) and x.dtype != torch.float64:
        return bhq_quantize_triton(x, spec, layout)
    if x.device.type == "cpu" and x.dtype != torch.float64:
        out = standalone_cpu(parsed, Layout(layout), bhq_quantize_ref, example=x)(x)
    else:
        out = bhq_quantize_ref(x, parsed, Layout(layout))
    return (in_input_layout(x, out[0].contiguous()), *(t.contiguous().clone() for t in out[1:]))


def bhq_quantize_triton(x: torch.Tensor, spec: str, layout: int):
    """``fqt::bhq_quantize_kernel``'s Triton launch (every output a buffer of its own)."""
    from fqt_compiler.codegen.kernels.bhq import bhq_quantize  # Triton: imported on first launch

    out = bhq_quantize(x, QuantSpec.from_key(spec), Layout(layout))
    return (in_input_layout(x, out[0].contiguous()), *(t.contiguous() for t in out[1:]))


@torch.library.custom_op("fqt::bhq_inverse_kernel", mutates_args=())
def _bhq_inverse_kernel(y: torch.Tensor, group: torch.Tensor, u: torch.Tensor, s: torch.Tensor, layout: int) -> torch.Tensor:
    if triton_here(y) and y.dtype != torch.float64:
        return bhq_inverse_triton(y, group, u, s, layout)
    if y.device.type == "cpu" and y.dtype != torch.float64:
        out = standalone_cpu(None, Layout(layout), bhq_inverse_ref, example=y)(y, group, u, s)
    else:
        out = bhq_inverse_ref(y, group, u, s, Layout(layout))
    return in_input_layout(y, out.contiguous())  # the strides its fake declares


def bhq_inverse_triton(y: torch.Tensor, group: torch.Tensor, u: torch.Tensor, s: torch.Tensor, layout: int) -> torch.Tensor:
    """``fqt::bhq_inverse_kernel``'s Triton launch."""
    from fqt_compiler.codegen.kernels.bhq import bhq_inverse  # Triton: imported on first launch

    return in_input_layout(y, bhq_inverse(y, group, u, s, Layout(layout)).contiguous())


@torch.library.custom_op("fqt::fake_quantize_kernel", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _fake_quantize_kernel(x: torch.Tensor, spec: str, layout: int) -> torch.Tensor:
    parsed = QuantSpec.from_key(spec)
    if parsed.quantizer is not None and triton_here(x):
        custom = get_quantizer(parsed.quantizer)
        if custom.kernel is not None:  # the user's kernel hook, same contract as the reference
            m = natural_2d(x, Layout(layout)).to(torch.float32)
            out = run_custom(parsed.quantizer, m, parsed, kernel=True)
            return in_input_layout(x, from_natural_2d(out.to(m.dtype), x.shape, Layout(layout)).to(x.dtype).contiguous())
    return fake_quantize_inline(x, spec, layout)


def fake_quantize_inline(x: torch.Tensor, spec: str, layout: int) -> torch.Tensor:
    """``fqt::fake_quantize_kernel`` without a custom kernel hook: the reference, in the strides
    its fake declares (traced as torch ops, Inductor fuses it)."""
    return in_input_layout(x, fake_quantize_ref(x, QuantSpec.from_key(spec), Layout(layout)).contiguous())


def kernel_hook(spec: str) -> bool:
    """Whether a spec quantizes through a custom quantizer's own kernel hook (user code)."""
    parsed = QuantSpec.from_key(spec)
    return parsed.quantizer is not None and get_quantizer(parsed.quantizer).kernel is not None


_fake_quantize_kernel.register_fake(lambda x, spec, layout: empty_in_input_layout(x, x.dtype))
_bhq_quantize_kernel.register_fake(lambda x, spec, layout: torch.ops.fqt.bhq_quantize.default(x, spec, layout))
_bhq_inverse_kernel.register_fake(lambda y, group, u, s, layout: empty_in_input_layout(y, y.dtype))

qmm_op = torch.ops.fqt.qmm.default
qbmm_op = torch.ops.fqt.qbmm.default
quantize_kernel_op = torch.ops.fqt.quantize_kernel.default
bhq_quantize_kernel_op = torch.ops.fqt.bhq_quantize_kernel.default
bhq_inverse_kernel_op = torch.ops.fqt.bhq_inverse_kernel.default
fake_quantize_kernel_op = torch.ops.fqt.fake_quantize_kernel.default


# ---------------------------------------------------------------- generated fused kernels
@torch.library.custom_op("fqt::fused_quantize", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _fused_quantize(
    leaves: list[torch.Tensor], program: str, shape: list[int], spec: str, layout: int, write_hp: bool, code_layout: int,
    partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    prog, parsed, lay, cl = Program.loads(program), QuantSpec.from_key(spec), Layout(layout), CodeLayout(code_layout)
    if triton_here(leaves[0]):
        return fused_quantize_triton(leaves, program, shape, spec, layout, write_hp, code_layout, partials)
    # the unfused computation: the chain op by op, then the reference quantizer (which
    # recomputes any statistics a GEMM epilogue gathered: the same values)
    x = run_reference(prog, list(leaves)).reshape(shape)
    codes, scale, zp, offset = quantize_ref(x, parsed, lay)
    shape = tuple(shape)
    # outputs in the memory order the fake declares (codes padded where a GEMM reads them)
    first = alloc_output(shape, codes.dtype, codes.device, cl, lay).copy_(codes)
    col = alloc_codes(shape, codes.dtype, codes.device, True, lay).copy_(codes) if cl is CodeLayout.BOTH else None
    hp = alloc_output(shape, x.dtype, x.device, cl, lay, codes=False).copy_(x) if write_hp else x.new_empty((0,))
    return (first, scale.contiguous().clone(), zp.contiguous().clone(), offset.contiguous().clone(), hp,
            col if col is not None else codes.new_empty((0,)))


def fused_quantize_triton(leaves, program, shape, spec, layout, write_hp, code_layout, partials=None):
    """``fqt::fused_quantize``'s Triton launch: every output allocated in the memory order the
    fake declares (column-major codes stay column-major), each a buffer of its own."""
    from fqt_compiler.codegen.kernels.fused import fused_quantize  # Triton: imported on first launch

    cl, lay, shape = CodeLayout(code_layout), Layout(layout), tuple(shape)
    out = fused_quantize(list(leaves), Program.loads(program), shape, QuantSpec.from_key(spec), lay, write_hp, code_layout=cl,
                         partials=partials)
    # the codes and the high-precision value come out in the order the fake declares
    return (out[0], *(t.contiguous() for t in out[1:4]), out[4], out[5])


@_fused_quantize.register_fake
def _fused_quantize_fake(leaves, program, shape, spec, layout, write_hp, code_layout, partials=None):
    prog, cl, lay, shape = Program.loads(program), CodeLayout(code_layout), Layout(layout), tuple(shape)
    x = leaves[0].new_empty(shape, dtype=prog.dtype)
    codes, scale, zp, offset = quantize_fake(x, spec, layout)
    first = alloc_output(shape, codes.dtype, codes.device, cl, lay)
    col = alloc_codes(shape, codes.dtype, codes.device, True, lay) if cl is CodeLayout.BOTH else codes.new_empty((0,))
    hp = alloc_output(shape, prog.dtype, x.device, cl, lay, codes=False) if write_hp else x.new_empty((0,))
    return (first, scale, zp, offset, hp, col)


fused_quantize_op = torch.ops.fqt.fused_quantize.default


@torch.library.custom_op("fqt::qmm_epilogue", mutates_args=())
def _qmm_epilogue(
    a: torch.Tensor, sa: torch.Tensor, za: torch.Tensor | None, oa: torch.Tensor | None,
    b: torch.Tensor, sb: torch.Tensor, zb: torch.Tensor | None, ob: torch.Tensor | None,
    bias: torch.Tensor | None, out_dtype: torch.dtype, leaves: list[torch.Tensor], program: str,
) -> torch.Tensor:
    if triton_here(a):
        return qmm_epilogue_triton(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype, leaves, program)
    # the unfused computation: the GEMM, stored in its dtype, then the consumers op by op
    prog = Program.loads(program)
    gemm = qmm_cpu(QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob), bias, out_dtype).view(prog.shape)
    return run_reference(prog, [gemm, *leaves]).contiguous()


def qmm_epilogue_triton(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype, leaves, program):
    """``fqt::qmm_epilogue``'s Triton launch (one generated kernel)."""
    from fqt_compiler.codegen.kernels.qmm_fused import qmm_fused  # Triton: imported on first launch

    prog = Program.loads(program)
    return qmm_fused(QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob), bias, out_dtype, list(leaves), prog).view(prog.shape)


@_qmm_epilogue.register_fake
def _qmm_epilogue_fake(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype, leaves, program):
    prog = Program.loads(program)
    return a.new_empty(prog.shape, dtype=prog.dtype)


qmm_epilogue_op = torch.ops.fqt.qmm_epilogue.default


@torch.library.custom_op("fqt::qmm_epilogue_stats", mutates_args=())
def _qmm_epilogue_stats(
    a: torch.Tensor, sa: torch.Tensor, za: torch.Tensor | None, oa: torch.Tensor | None,
    b: torch.Tensor, sb: torch.Tensor, zb: torch.Tensor | None, ob: torch.Tensor | None,
    bias: torch.Tensor | None, out_dtype: torch.dtype, leaves: list[torch.Tensor], program: str, quant: str, symmetric: bool,
    columns: bool, qleaves: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    if triton_here(a):
        return qmm_epilogue_stats_triton(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype, leaves, program, quant, symmetric,
                                         columns, qleaves)
    from fqt_compiler.codegen.kernels.qmm_fused import stat_slots  # Triton: imported on first launch

    prog, qprog = Program.loads(program), Program.loads(quant)
    gemm = qmm_cpu(QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob), bias, out_dtype).view(prog.shape)
    out = run_reference(prog, [gemm, *leaves]).contiguous()
    m, n = a.shape[0], b.shape[1]
    x = run_reference(qprog, [out.view(m, n), *qleaves])  # quant's shape is the (M, N) output's
    return out, reference_partials(x.t() if columns else x, stat_slots(m if columns else n, a.device, columns), symmetric)


def qmm_epilogue_stats_triton(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype, leaves, program, quant, symmetric, columns,
                              qleaves):
    """``fqt::qmm_epilogue_stats``'s Triton launch: the chain's value and the next quantizer's
    partial statistics from one generated kernel."""
    from fqt_compiler.codegen.kernels.qmm_fused import qmm_fused  # Triton: imported on first launch

    prog, qprog = Program.loads(program), Program.loads(quant)
    qa, qb = QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob)
    out, partials = qmm_fused(qa, qb, bias, out_dtype, list(leaves), prog, qprog, symmetric, columns, list(qleaves))
    return out.view(prog.shape), partials


@_qmm_epilogue_stats.register_fake
def _qmm_epilogue_stats_fake(a, sa, za, oa, b, sb, zb, ob, bias, out_dtype, leaves, program, quant, symmetric, columns, qleaves):
    from fqt_compiler.codegen.kernels.qmm_fused import stat_slots  # Triton: imported on first launch

    prog = Program.loads(program)
    m, n = a.shape[0], b.shape[1]
    partials = a.new_empty(((n if columns else m), stat_slots(m if columns else n, a.device, columns), 3), dtype=torch.float32)
    return a.new_empty(prog.shape, dtype=prog.dtype), partials


qmm_epilogue_stats_op = torch.ops.fqt.qmm_epilogue_stats.default


#: Each kernel op of a lowered graph -> the function of the op's arguments that launches its
#: Triton kernel(s) (CUDA, or CPU tensors under Triton's interpreter): the op's body there, and
#: what ``codegen.launches`` traces so that Inductor launches the kernels itself. Same outputs
#: (shapes, strides, dtypes) as the op's fake.
TRITON_LAUNCHES = {
    qmm_op: qmm_triton,
    qbmm_op: qbmm_triton,
    quantize_kernel_op: quantize_triton,
    bhq_quantize_kernel_op: bhq_quantize_triton,
    bhq_inverse_kernel_op: bhq_inverse_triton,
    fake_quantize_kernel_op: fake_quantize_inline,
    fused_quantize_op: fused_quantize_triton,
    qmm_epilogue_op: qmm_epilogue_triton,
    qmm_epilogue_stats_op: qmm_epilogue_stats_triton,
}

# ---------------------------------------------------------------- ops of monitored graphs
# Probes of a monitored graph (passes/monitor_graph.py): a float64 vector each, from the
# bodies in monitor_stats.py (which Inductor-compiled graphs trace in instead, to fuse them).
# Only monitored variants contain them.
@torch.library.custom_op("fqt::monitor_codes", mutates_args=())
def _monitor_codes(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   offset: torch.Tensor, spec: str) -> torch.Tensor:
    return quantizer_stats(x, codes, scale, zero_point, offset, QuantSpec.from_key(spec))


@torch.library.custom_op("fqt::monitor_fake", mutates_args=())
def _monitor_fake(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return fake_quantizer_stats(x, x_hat)


@torch.library.custom_op("fqt::monitor_error", mutates_args=())
def _monitor_error(y: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    return error_stats(y, y_ref)


@torch.library.custom_op("fqt::monitor_gradient", mutates_args=())
def _monitor_gradient(g: torch.Tensor, g_redraw: torch.Tensor, g_exact: torch.Tensor, g_half_a: torch.Tensor | None,
                      g_half_b: torch.Tensor | None, g_second: torch.Tensor | None, axis: int) -> torch.Tensor:
    return gradient_stats(g, g_redraw, g_exact, g_half_a, g_half_b, g_second, axis)


for _op, _n in ((_monitor_codes, QUANTIZER_FIELDS), (_monitor_fake, QUANTIZER_FIELDS), (_monitor_error, ERROR_FIELDS),
                (_monitor_gradient, GRADIENT_FIELDS)):
    _op.register_fake(lambda x, *args, _n=len(_n): x.new_empty((_n,), dtype=torch.float64))

monitor_codes_op = torch.ops.fqt.monitor_codes.default
monitor_fake_op = torch.ops.fqt.monitor_fake.default
monitor_error_op = torch.ops.fqt.monitor_error.default
monitor_gradient_op = torch.ops.fqt.monitor_gradient.default


# ---------------------------------------------------------------- convolutions (fqt_compiler.conv)
# fqt::qconv: one GEMM of a convolution (``output``, ``grad_input`` or ``grad_weight``, by its
# integer ``kind``: conv_paths.CONV_KINDS) on two operands' codes and statistics, dequantized,
# laid out as the convolution it replaces was (``channels_last``) on every path and in the fake.
# fqt::conv_codes: the CPU int8 sums alone (conv_paths.conv_codes), in a fixed memory order.
# Exact strides: Inductor would otherwise choose the layout of every input of an op a pass
# inserted, and it wrote channels-last operands' codes contiguous through transposes, which the
# kernels then copied back. It constrains only ops whose traced inputs are recorded, which the
# last pipeline step does (codegen.inline.record_input_strides). A fixed stride order held it
# too, but on symbolic image sizes its stride comparisons raised inside torch's range analysis.
@torch.library.custom_op("fqt::qconv", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _qconv(
    kind: int,
    a: torch.Tensor,
    sa: torch.Tensor,
    za: torch.Tensor | None,
    oa: torch.Tensor | None,
    b: torch.Tensor,
    sb: torch.Tensor,
    zb: torch.Tensor | None,
    ob: torch.Tensor | None,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_shape: list[int],
    out_dtype: torch.dtype,
    channels_last: bool,
) -> torch.Tensor:
    args = (kind, a, sa, za, oa, b, sb, zb, ob, bias, stride, padding, dilation, groups, out_shape, out_dtype, channels_last)
    if a.device.type == "cuda":
        return qconv_triton(*args)
    if a.device.type == "cpu":
        return qconv_cpu_of_op_args(*args)
    gemm = CONV_KINDS[kind]
    geo = ConvGeometry.of_call(gemm, a.shape, b.shape, out_shape, stride, padding, dilation, groups)
    return qconv_ref(gemm, QOperand(a, sa, za, oa), QOperand(b, sb, zb, ob), geo, bias, out_dtype, channels_last)


@_qconv.register_fake
def _qconv_fake(kind, a, sa, za, oa, b, sb, zb, ob, bias, stride, padding, dilation, groups, out_shape, out_dtype, channels_last):
    fmt = out_memory_format(channels_last, len(out_shape))
    # allocated in its memory format: no copy of an empty tensor to reach it
    return torch.empty(out_shape, dtype=out_dtype, device=a.device, memory_format=fmt)


@torch.library.custom_op("fqt::conv_codes", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _conv_codes(kind: int, a: torch.Tensor, b: torch.Tensor, a_zero: torch.Tensor | None, stride: list[int],
                padding: list[int], dilation: list[int], groups: int, out_shape: list[int]) -> torch.Tensor:
    return conv_codes(kind, a, b, a_zero, stride, padding, dilation, groups, out_shape)


@_conv_codes.register_fake
def _conv_codes_fake(kind, a, b, a_zero, stride, padding, dilation, groups, out_shape):
    dtype, strides = conv_codes_layout(kind, out_shape)
    return a.new_empty_strided(out_shape, strides, dtype=dtype)


qconv_op = torch.ops.fqt.qconv.default
conv_codes_op = torch.ops.fqt.conv_codes.default
TRITON_LAUNCHES[qconv_op] = qconv_triton
