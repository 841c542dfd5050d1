"""Test-wide settings: tiny models run fastest single-threaded (and do not oversubscribe the
CPU when pytest, subprocesses and torchrun workers run side by side); without a GPU, Triton
kernels run in Triton's interpreter (set before climber is imported, as @triton.jit reads it)."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
