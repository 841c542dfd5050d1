"""Test-wide settings: tiny models run fastest single-threaded (and do not oversubscribe the
CPU when pytest, subprocesses and torchrun workers run side by side)."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
