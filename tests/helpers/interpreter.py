"""Whether Triton's interpreter works with the installed numpy."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _loop_kernel(x_ptr, n):
    # a runtime scalar as a loop bound: the interpreter turns it into a Python int
    for i in range(0, n):
        tl.store(x_ptr + i, i)


def interpreter_problem() -> str | None:
    """None if a tiny kernel runs under the interpreter; else what is wrong and how to fix it.
    (triton 3.6's interpreter calls ``int()`` on one-element arrays, which numpy >= 2.4 refuses.)"""
    import numpy
    import torch

    try:
        x = torch.zeros(4, dtype=torch.int32)
        _loop_kernel[(1,)](x, 4)
        if x.tolist() != [0, 1, 2, 3]:
            return f"Triton's interpreter (triton {triton.__version__}) computed {x.tolist()} for [0, 1, 2, 3]"
    except Exception as exc:  # any failure means no kernel test can run here
        return (f"Triton's interpreter does not run here (triton {triton.__version__}, numpy {numpy.__version__}): "
                f"{type(exc).__name__}: {exc}. triton 3.6's interpreter needs numpy<2.4: pip install 'numpy<2.4', "
                "or use a newer triton")
    return None
