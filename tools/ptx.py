"""How the low-bit GEMM loads its operands on sm_90, read from the compiled PTX (no GPU needed).

``python -m fqt_compiler.tools.ptx`` compiles ``fqt_compiler.codegen.kernels.qmm.qmm_kernel`` for an H100 (sm_90) with
each operand K-major or not and counts, per variant, the asynchronous global->shared copies
(``cp.async``), the shared-memory stores and byte permutes that a register round trip needs
instead, and the ``wgmma`` instructions. It is the evidence behind ``fqt_compiler.codegen.code_layout``:
an 8-bit operand that is not K-major is not copied asynchronously (so not pipelined over the
kernel's stages); it goes through registers on every K step. Counts are static instruction
counts in the PTX, not timings. Must run without ``TRITON_INTERPRET``.

Triton is imported on use: the module documents itself without it.
"""

from __future__ import annotations

import re

__all__ = ["operand_loads", "qmm_ptx", "rows_ptx", "ptxas_usage", "spill_table", "main"]

_NAMES = ["a_ptr", "b_ptr", "out_ptr", "sa_ptr", "sb_ptr", "za_ptr", "zb_ptr", "oa_ptr", "ob_ptr", "bias_ptr", "M", "N", "K",
          "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_om", "stride_on", "stride_sa", "stride_sb"]


_CODES = {"int8": "*i8", "fp8": "*fp8e4nv", "e4m3": "*fp8e4nv", "e5m2": "*fp8e5"}


def qmm_ptx(a_k_major: bool, b_k_major: bool, dtype: str = "int8", b_dtype: str | None = None, even_k: bool = True,
            tile: tuple[int, int, int, int, int] = (128, 128, 128, 3, 8), affine: bool = False) -> str:
    """PTX of the qmm kernel compiled for sm_90 (128x128x128 tiles, 3 stages, 8 warps, the H100
    autotune entry, or ``tile`` = (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)) with the given
    operand memory orders and code dtypes (``int8``, ``fp8`` / ``e4m3``, ``e5m2``; ``b_dtype``
    defaults to ``dtype``); ``even_k``: K a multiple of the K tile (no load masks); ``affine``:
    zero points (row and column sums in the K loop)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from fqt_compiler.codegen.kernels.qmm import qmm_kernel

    sig = {n: ("*fp32" if n.endswith("ptr") else "i32") for n in _NAMES}
    sig.update(a_ptr=_CODES[dtype], b_ptr=_CODES[b_dtype or dtype], out_ptr="*bf16")
    # unit strides are what Triton specializes at launch; they tell it which dim is contiguous
    ones = {"stride_ak" if a_k_major else "stride_am": 1, "stride_bk" if b_k_major else "stride_bn": 1, "stride_on": 1,
            "stride_sa": 1, "stride_sb": 1}
    bm, bn, bk, stages, warps = tile
    const = dict(IS_INT=dtype == "int8", AFFINE=affine, HAS_BIAS=False, EVEN_K=even_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 GROUP_M=8, **ones)
    sig.update({k: "constexpr" for k in const})
    aligned = [i for i, n in enumerate(_NAMES)
               if n not in ones and (n.endswith("ptr") or n in ("M", "N", "K") or n.startswith("stride_"))]
    src = triton.compiler.ASTSource(fn=qmm_kernel, signature=sig, constexprs=const,
                                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages)).asm["ptx"]


_QBMM_NAMES = ["a_ptr", "b_ptr", "out_ptr", "sa_ptr", "sb_ptr", "za_ptr", "zb_ptr", "oa_ptr", "ob_ptr", "M", "N", "K",
               "stride_ab", "stride_am", "stride_ak", "stride_bb", "stride_bk", "stride_bn", "stride_ob", "stride_om",
               "stride_on", "stride_sab", "stride_sa", "stride_sbb", "stride_sb"]


def qbmm_ptx(dtype: str = "int8", affine: bool = False, tile: tuple[int, int, int, int, int] = (128, 128, 128, 3, 8),
             b_k_major: bool = True) -> str:
    """PTX of the batched GEMM kernel (``kernels/qbmm.py``) compiled for sm_90 with ``dtype``
    codes (``int8``, ``e4m3``, ``e5m2``), A K-major, B K-major or N-major (``b_k_major``: attention's
    ``P V`` reads V N-major) and, with ``affine``, zero points and offsets (their row and column
    sums in the K loop)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from fqt_compiler.codegen.kernels.qbmm import qbmm_kernel

    sig = {n: ("*fp32" if n.endswith("ptr") else "i32") for n in _QBMM_NAMES}
    sig.update(a_ptr=_CODES[dtype], b_ptr=_CODES[dtype], out_ptr="*bf16")
    ones = {"stride_ak": 1, "stride_bk" if b_k_major else "stride_bn": 1, "stride_on": 1, "stride_sa": 1, "stride_sb": 1}
    bm, bn, bk, stages, warps = tile
    const = dict(IS_INT=dtype == "int8", AFFINE=affine, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, **ones)
    sig.update({k: "constexpr" for k in const})
    aligned = [i for i, n in enumerate(_QBMM_NAMES) if n not in ones and not n.startswith("stride_s")]
    src = triton.compiler.ASTSource(fn=qbmm_kernel, signature=sig, constexprs=const,
                                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages)).asm["ptx"]


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers per thread and spill bytes (stores + loads) of ``ptx`` assembled for sm_90a by
    the ptxas Triton ships, as its ``-v`` report gives them."""
    import os
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else -1}


def operand_loads(a_k_major: bool, b_k_major: bool, dtype: str = "int8", b_dtype: str | None = None) -> dict[str, int]:
    """Static PTX instruction counts of :func:`qmm_ptx`: asynchronous copies, shared stores,
    byte permutes, wgmma instructions, and fp32 adds (an fp8 kernel's accumulator promotions)."""
    ptx = qmm_ptx(a_k_major, b_k_major, dtype, b_dtype)
    return {
        "cp.async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
        "st.shared": len(re.findall(r"st\.shared", ptx)),
        "prmt": len(re.findall(r"\bprmt\b", ptx)),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "add.f32": len(re.findall(r"\badd(?:\.rn)?\.f32\b", ptx)),
    }


def _epilogue_ptx(codes: str, tile: tuple[int, int, int, int, int]) -> str:
    """PTX of a heavy generated epilogue-fused GEMM for sm_90: ``* 0.5 + residual, GELU (tanh)``
    in bf16, then the next quantizer's statistics over GELU's backward of the stored value."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    from fqt_compiler.codegen.kernels.fused import load_source
    from fqt_compiler.codegen.kernels.qmm_fused import generate_epilogue_source
    from fqt_compiler.fusion_program import Program

    prog = Program((8, 16), (("mul", (("L", 0), 0.5), "bfloat16", "none"), ("add", (("V", 0), ("L", 1)), "bfloat16", "none"),
                             ("gelu", (("V", 1),), "bfloat16", "tanh")), 2)
    quant = Program((8, 16), (("gelu_backward", (("L", 0), ("L", 1)), "bfloat16", "none"),), 2)
    kernel = load_source(generate_epilogue_source(prog, torch.bfloat16, quant)).qmm_epilogue_kernel
    strides = ["stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_om", "stride_on", "stride_sa", "stride_sb", "s1r",
               "s1c", "qs1r", "qs1c", "stride_pm"]
    sig = {"a_ptr": _CODES[codes], "b_ptr": _CODES[codes], "out_ptr": "*bf16",
           **{k: "*fp32" for k in ("sa_ptr", "sb_ptr", "za_ptr", "zb_ptr", "oa_ptr", "ob_ptr", "bias_ptr")},
           "in1_ptr": "*bf16", "qin1_ptr": "*bf16", "part_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           **{k: "i32" for k in strides}}
    bm, bn, bk, stages, warps = tile
    const = dict(IS_INT=codes == "int8", AFFINE=False, HAS_BIAS=True, SYMMETRIC=True, COLUMNS=False, EVEN_K=True,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    sig.update({k: "constexpr" for k in const})
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages)).asm["ptx"]


_ROWS_DEFAULTS = dict(SCHEME=0, FP8=0, STOCHASTIC=True, STATS_GIVEN=False, QMAX=127.0, LEVELS=255, CODE_OFFSET=0, FP8_MANT=3,
                     FP8_EMIN=-6, TRANSFORM=False, PERMUTED=False)


def rows_ptx(block_r: int, block_c: int, one_pass: bool, warps: int, x_type: str = "*bf16", codes_type: str = "*i8",
             **constexprs) -> str:
    """PTX of the quantize rows kernel for sm_90; by default stochastic int8 codes of bf16 rows,
    ``constexprs`` overriding the kernel's meta-parameters (``SCHEME``, ``FP8``, ``QMAX``...)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from fqt_compiler.codegen.kernels.quantize import quantize_rows_kernel

    names = ["x_ptr", "codes_ptr", "scale_ptr", "zp_ptr", "offset_ptr", "stats_ptr", "seed_ptr", "group_ptr", "u_ptr", "s_ptr",
             "proj_ptr", "R", "C", "stride_xr", "stride_xc", "stride_cr", "stride_cc", "stride_pg", "perm_inner", "perm_outer"]
    types = [x_type, codes_type, "*fp32", "*fp32", "*fp32", "*fp32", "*i64", "*i64", "*fp32", "*fp32", "*fp32"] + ["i32"] * 9
    const = {**_ROWS_DEFAULTS, **constexprs, "ONE_PASS": one_pass, "BLOCK_R": block_r, "BLOCK_C": block_c}
    sig = {**dict(zip(names, types)), **{k: "constexpr" for k in const}}
    src = triton.compiler.ASTSource(fn=quantize_rows_kernel, signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps)).asm["ptx"]


def spill_table() -> list[dict]:
    """Registers and spill bytes of every sm_90 autotune tile (``qmm.SM90_TILES``): the plain
    GEMM for int8 codes (with zero points too) and fp8 codes, and a heavy generated epilogue (``_epilogue_ptx``) for both;
    then the quantize rows kernel at its largest one-pass tiles and its two-pass chunk."""
    from fqt_compiler.codegen.kernels.qmm import SM90_TILES, Family

    rows = []
    for block_r, block_c, one_pass, warps in ((2, 4096, True, 8), (8, 1024, True, 8), (1, 16384, True, 16), (1, 1024, False, 4),
                                              (4, 512, False, 8), (16, 64, False, 4)):
        rows.append({"family": "quantize rows" + (" (one pass)" if one_pass else " (two passes)"), "codes": "int8",
                     "tile": (block_r, block_c, 0, 0, warps), **ptxas_usage(rows_ptx(block_r, block_c, one_pass, warps))})
    for family, tiles in SM90_TILES.items():
        for tile in tiles:
            for codes in (("int8", "fp8") if family is Family.EPILOGUE else ("fp8",) if family is Family.FP8 else ("int8",)):
                ptx = _epilogue_ptx(codes, tile) if family is Family.EPILOGUE else \
                    qmm_ptx(True, True, codes, tile=tile, affine=family is Family.INT8_AFFINE)
                rows.append({"family": family.value, "codes": codes, "tile": tile, **ptxas_usage(ptx)})
    return rows


def _tile_text(row: dict) -> str:
    bm, bn, bk, stages, warps = row["tile"]
    if row["family"].startswith("quantize"):
        return f"{bm} rows x {bn} columns, {warps} warps"
    return f"{bm}x{bn}x{bk}, {stages} stages, {warps} warps"


def main() -> None:
    from tabulate import tabulate

    rows = []
    for dtype in ("int8", "fp8"):
        for a_k in (True, False):
            for b_k in (True, False):
                c = operand_loads(a_k, b_k, dtype)
                rows.append([dtype, "K-major" if a_k else "M-major", "K-major" if b_k else "N-major", *c.values()])
    print(tabulate(rows, headers=["codes", "A", "B", "cp.async", "st.shared", "prmt", "wgmma", "add.f32"], tablefmt="github"))
    spills = [[r["family"], r["codes"], _tile_text(r), r["registers"], r["spill_bytes"]] for r in spill_table()]
    print()
    print(tabulate(spills, headers=["kernel", "codes", "tile", "registers", "spill bytes"], tablefmt="github"))


if __name__ == "__main__":
    main()
