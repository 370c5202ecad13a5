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

__all__ = ["operand_loads", "qmm_ptx", "main"]

_NAMES = ["a_ptr", "b_ptr", "out_ptr", "sa_ptr", "sb_ptr", "za_ptr", "zb_ptr", "oa_ptr", "ob_ptr", "bias_ptr", "M", "N", "K",
          "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_om", "stride_on", "stride_sa", "stride_sb"]


_CODES = {"int8": "*i8", "fp8": "*fp8e4nv", "e4m3": "*fp8e4nv", "e5m2": "*fp8e5"}


def qmm_ptx(a_k_major: bool, b_k_major: bool, dtype: str = "int8", b_dtype: str | None = None) -> str:
    """PTX of the qmm kernel compiled for sm_90 (128x128x128 tiles, 3 stages, 8 warps, the H100
    autotune entry) with the given operand memory orders and code dtypes (``int8``, ``fp8`` /
    ``e4m3``, ``e5m2``; ``b_dtype`` defaults to ``dtype``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from fqt_compiler.codegen.kernels.qmm import qmm_kernel

    sig = {n: ("*fp32" if n.endswith("ptr") else "i32") for n in _NAMES}
    sig.update(a_ptr=_CODES[dtype], b_ptr=_CODES[b_dtype or dtype], out_ptr="*bf16")
    # unit strides are what Triton specializes at launch; they tell it which dim is contiguous
    ones = {"stride_ak" if a_k_major else "stride_am": 1, "stride_bk" if b_k_major else "stride_bn": 1, "stride_on": 1,
            "stride_sa": 1, "stride_sb": 1}
    const = dict(IS_INT=dtype == "int8", AFFINE=False, HAS_BIAS=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, **ones)
    sig.update({k: "constexpr" for k in const})
    aligned = [i for i, n in enumerate(_NAMES)
               if n not in ones and (n.endswith("ptr") or n in ("M", "N", "K") or n.startswith("stride_"))]
    src = triton.compiler.ASTSource(fn=qmm_kernel, signature=sig, constexprs=const,
                                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3)).asm["ptx"]


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


def main() -> None:
    from tabulate import tabulate

    rows = []
    for dtype in ("int8", "fp8"):
        for a_k in (True, False):
            for b_k in (True, False):
                c = operand_loads(a_k, b_k, dtype)
                rows.append([dtype, "K-major" if a_k else "M-major", "K-major" if b_k else "N-major", *c.values()])
    print(tabulate(rows, headers=["codes", "A", "B", "cp.async", "st.shared", "prmt", "wgmma", "add.f32"], tablefmt="github"))


if __name__ == "__main__":
    main()
