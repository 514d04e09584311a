"""Without a CUDA device the Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (it is read when @triton.jit
decorates a kernel), and conftest.py is imported before the test modules.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
