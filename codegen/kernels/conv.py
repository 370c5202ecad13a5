"""Triton convolution GEMMs: ``f(a_codes, b_codes)`` of ``fqt_compiler.conv`` on int8 or fp8 codes.

* ``output``: an implicit GEMM (:func:`conv_kernel`). Output pixels (n, o0, o1, o2) are the
  GEMM's rows, the group's output channels its columns, and the contraction runs over the
  kernel window and the group's input channels, read K-major: the activation channels-last
  (N, *spatial, C) and the weight (K, *kernel, C/G), so every tile loads contiguous channels.
  Window positions outside the input load code 0 (contributing nothing: the sums are of codes,
  and the statistics are applied afterwards). 1-D and 2-D convolutions run as 3-D ones with
  unit dims. int8 codes accumulate in int32 (exact), fp8 in fp32 (promoted once per channel
  tile, as the GEMM kernel does).
* ``grad_input``: the same kernel on dY spread ``stride`` apart (zero codes between) with the
  spatially flipped, channel-swapped weight, as the CPU path.
* ``grad_weight``: the GEMM ``dY^T (K x N*P) @ cols (N*P x offsets*C)``, where ``cols`` holds
  the input codes shifted to every kernel offset side by side (im2col), on the Triton GEMM
  kernel (``qmm`` with unit scales: the exact sums, as fp32), one launch per group for all
  offsets. Groups smaller than ``GROUP_GEMM_MIN`` (a depthwise layer's 1 x 1 products: a
  launch per group was thousands of launches a layer) run instead as one batched fp64 GEMM of
  the codes over the groups per offset: exact for int8, rounded to fp32 once as the kernel's
  int32 sums are.

The result is the accumulator as fp32; ``conv.dequantize_conv_accumulator`` applies the
statistics, as on the CPU. Tested against the fp64 convolution of the codes under Triton's
interpreter, bit for bit for int8.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fqt_compiler.conv import ConvGeometry
from fqt_compiler.grid import QOperand
from fqt_compiler.specs import GemmKind
from fqt_compiler.codegen.kernels.launch import launch
from fqt_compiler.codegen.kernels.qmm import FP8_DTYPES, qmm

__all__ = ["conv_kernel", "conv_codes_triton", "implicit_gemm", "SM90_CONFIG"]

# 64x64 output tiles over 32-channel steps, 8 warps: ptxas assembles it for sm_90 without
# spills (159 registers for int8; 4 warps spilled, as did 128-row or 64-channel tiles)
SM90_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_C=32, num_warps=8, num_stages=2)


@triton.jit
def conv_kernel(
    x_ptr, w_ptr, out_ptr, M, K_g, C_g,
    P0, P1, P2, D0, D1, D2, S0, S1, S2, Q0, Q1, Q2, L0, L1, L2, R0, R1, R2,
    sxn, sx0, sx1, sx2, sxc, swk, sw0, sw1, sw2, swc, son, so0, so1, so2, sok,
    IS_INT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[n, o, k] = sum over window r and channel c of x[n, o*S + r*L - Q, c] * w[k, r, c]
    within group ``program_id(2)``; S stride, Q padding, L dilation, D input and P output sizes."""
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    o2 = rm % P2
    t = rm // P2
    o1 = t % P1
    t = t // P1
    o0 = t % P0
    n = (t // P0).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < K_g
    k_idx = (g * K_g + rn).to(tl.int64)
    rc = tl.arange(0, BLOCK_C).to(tl.int64)
    if IS_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + n * sxn + (g * C_g).to(tl.int64) * sxc
    w_cols = w_ptr + k_idx * swk
    # one flat loop over (window position, channel tile): scalar index math per step, and a
    # single loop the compiler can software-pipeline
    c_tiles = tl.cdiv(C_g, BLOCK_C)
    for step in range(0, R0 * R1 * R2 * c_tiles):
        c0 = (step % c_tiles) * BLOCK_C
        r = step // c_tiles
        r2 = r % R2
        r1 = (r // R2) % R1
        r0 = r // (R2 * R1)
        i0 = o0 * S0 + r0 * L0 - Q0
        i1 = o1 * S1 + r1 * L1 - Q1
        i2 = o2 * S2 + r2 * L2 - Q2
        ok = m_ok & (i0 >= 0) & (i0 < D0) & (i1 >= 0) & (i1 < D1) & (i2 >= 0) & (i2 < D2)
        a_row = x_rows + i0.to(tl.int64) * sx0 + i1.to(tl.int64) * sx1 + i2.to(tl.int64) * sx2
        b_col = w_cols + r0 * sw0 + r1 * sw1 + r2 * sw2
        cc = c0 + rc
        c_ok = cc < C_g
        a_mask = ok[:, None] & c_ok[None, :]
        b_mask = c_ok[:, None] & n_ok[None, :]
        if IS_INT:
            a = tl.load(a_row[:, None] + cc[None, :] * sxc, mask=a_mask, other=0)
            b = tl.load(b_col[None, :] + cc[:, None] * swc, mask=b_mask, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:  # fp8: the padding value must be a float for the fp8 cast
            a = tl.load(a_row[:, None] + cc[None, :] * sxc, mask=a_mask, other=0.0)
            b = tl.load(b_col[None, :] + cc[:, None] * swc, mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_C)
    out_ptrs = out_ptr + n[:, None] * son + (o0.to(tl.int64) * so0 + o1.to(tl.int64) * so1 + o2.to(tl.int64) * so2)[:, None]
    tl.store(out_ptrs + k_idx[None, :] * sok, acc.to(tl.float32), mask=m_ok[:, None] & n_ok[None, :])


def _launch_options(device: torch.device) -> dict:
    """Warps and stages on a GPU (the interpreter takes neither)."""
    return {"num_warps": SM90_CONFIG["num_warps"], "num_stages": SM90_CONFIG["num_stages"]} if device.type == "cuda" else {}


def _three(values, fill) -> list:
    """A 1-D / 2-D convolution's per-dim values as 3-D ones (leading unit dims)."""
    values = list(values)
    return [fill] * (3 - len(values)) + values


def implicit_gemm(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """sum over (in channels x window) of x * w (codes), as fp32: (N, K, *out)."""
    n_sp = x.dim() - 2
    if n_sp > 3:
        raise ValueError(f"implicit_gemm: {n_sp}-D convolutions are not supported (1-D to 3-D are)")
    k, cg = w.shape[0], w.shape[1]
    out_sp = [(d + 2 * p - dl * (kk - 1) - 1) // s + 1
              for d, p, dl, kk, s in zip(x.shape[2:], padding, dilation, w.shape[2:], stride)]
    meta = {k: v for k, v in SM90_CONFIG.items() if k.startswith("BLOCK")}
    x_cl = x.movedim(1, -1).contiguous()  # (N, *spatial, C): channels K-major
    w_cl = w.movedim(1, -1).contiguous()  # (K, *kernel, C/G)
    out = torch.empty((x.shape[0], *out_sp, k), dtype=torch.float32, device=x.device)
    m = out.numel() // k if k else 0
    if m == 0 or k == 0:
        return out.movedim(-1, 1)
    xs = _three(x_cl.stride()[1:-1], 0)
    ws = _three(w_cl.stride()[1:-1], 0)
    os_ = _three(out.stride()[1:-1], 0)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k // groups, meta["BLOCK_N"]), groups)
    launch(
        conv_kernel, grid, x_cl, w_cl, out, m, k // groups, cg,
        *_three(out_sp, 1), *_three(x.shape[2:], 1), *_three(stride, 1), *_three(padding, 0), *_three(dilation, 1),
        *_three(w.shape[2:], 1),
        x_cl.stride(0), *xs, x_cl.stride(-1), w_cl.stride(0), *ws, w_cl.stride(-1), out.stride(0), *os_, out.stride(-1),
        IS_INT=x.dtype == torch.int8, **meta, **_launch_options(x.device),
    )
    return out.movedim(-1, 1)


def _grad_input(geo: ConvGeometry, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x, wt, padding, crop = geo.dgrad_as_forward(g, w)
    out = implicit_gemm(x, wt, [1] * geo.spatial, padding, geo.dilation, geo.groups)
    return out if crop is None else out[crop]


def _grad_weight(geo: ConvGeometry, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    G = geo.groups
    N, K, *out_sp = g.shape
    C = x.shape[1]
    Kg, Cg = K // G, C // G
    rows = N
    for q in out_sp:
        rows *= q
    g_rows = g.movedim(1, -1).reshape(rows, K)  # (N*P, K)
    pads = [v for p in reversed(geo.padding) for v in (p, p)]
    xp = F.pad(x.movedim(1, -1), [0, 0, *pads])
    offsets = list(itertools.product(*(range(kk) for kk in geo.w_shape[2:])))
    windows = []
    for offset in offsets:
        window = tuple(slice(r * d, r * d + (q - 1) * s + 1, s) for r, d, q, s in zip(offset, geo.dilation, out_sp, geo.stride))
        windows.append(xp[(slice(None), *window)].unflatten(-1, (G, Cg)))  # (N, *P, G, C/G): a view
    # the windows side by side, (N*P, G, offsets, C/G), written once by the stack (a window
    # reshaped to rows first was a copy of its own): one GEMM per group covers every kernel
    # offset (its columns are (offset, channel) pairs), where a GEMM per offset was 9 launches
    # and 9 copies of the activation codes for a 3x3 layer
    # reshape, not view: stacking a 1-D convolution's 4-D windows can pick a channels-last
    # memory format for the result (torch.cat follows its inputs' suggested format)
    cols = torch.stack(windows, -2).reshape(rows, G, len(offsets), Cg)
    R = len(offsets)
    if geo.small_groups:
        # small groups (a depthwise layer's are 1 x 1): one batched GEMM over the groups per
        # offset, not a launch per group; fp64 holds every product of two codes and their sums
        # exactly for int8 (rounded to fp32 once, as the kernel's int32 sums are) and to fp64 for
        # fp8. Per offset: the fp64 copy of all offsets at once would be 8 x offsets x the codes
        a = g_rows.view(rows, G, Kg).permute(1, 2, 0).to(torch.float64)  # (G, K/G, N*P)
        parts = [torch.bmm(a, cols[:, :, r].transpose(0, 1).to(torch.float64)) for r in range(R)]  # (G, K/G, C/G)
        out = torch.stack(parts, 2).to(torch.float32).reshape(K, R, Cg)
    else:
        one = torch.ones((), dtype=torch.float32, device=x.device)
        g_t = g_rows.t()  # (K, N*P): a strided view, qmm reads strides
        out = torch.cat([qmm(QOperand(g_t[i * Kg:(i + 1) * Kg], one), QOperand(cols[:, i].reshape(rows, R * Cg), one))
                         for i in range(G)], 0).view(K, R, Cg)
    return out.permute(0, 2, 1).reshape(geo.w_shape)  # (K, C/G, *kernel)


def conv_codes_triton(kind: GemmKind, a: torch.Tensor, b: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """``geo.bilinear(kind, a, b)`` on int8 or fp8 codes (CUDA, or CPU under the interpreter)."""
    ok = a.dtype == b.dtype == torch.int8 or (a.dtype in FP8_DTYPES and b.dtype in FP8_DTYPES)
    if not ok:
        raise TypeError(f"conv_codes_triton: codes must be int8 or fp8 (any pair), got {a.dtype} and {b.dtype}")
    if kind is GemmKind.OUTPUT:
        return implicit_gemm(a, b, geo.stride, geo.padding, geo.dilation, geo.groups)
    if kind is GemmKind.GRAD_INPUT:
        return _grad_input(geo, a, b)
    return _grad_weight(geo, a, b)
