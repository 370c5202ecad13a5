"""Where the kernel tests run their kernels: CUDA tensors on a GPU machine, CPU tensors under
Triton's interpreter everywhere else (see tests/conftest.py)."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
