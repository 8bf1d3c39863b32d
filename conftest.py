"""Root conftest: without a CUDA GPU, Triton kernels run in its interpreter on the CPU.

The variable must be set before triton is first imported, which is why it lives here, at the root,
ahead of every test and benchmark module. ``import torch`` does not import triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
