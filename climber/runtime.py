"""Speed, applied to a built model from outside (as torchtitan's `parallelize`): the device,
the attention backend, the precision policy and torch.compile regions. The model file is the
math; nothing here is saved with a checkpoint, so a run trained with one backend evaluates,
resumes and serves with any other.

Precision: on CUDA, bf16 autocast (fp32 weights and optimizer state) and a bf16 residual
stream, which halves the states' memory traffic; on CPU, fp32.

CPU memory: glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh
mmap, so each activation that size is page-faulted in anew on every step. At the quick start's
size the FFN's activations are 37 MiB; `apply` raises the threshold and the trim threshold to
1 GiB on CPU (`mallopt`), which took a training step from about 0.74 to 0.60 s on 2 cores
(docs/performance.md). Freed memory then stays with the process.

Compile (`--compile`): the ATL's and BGF's GELU (tanh form) is swapped for `SigmoidGELU`, the
same function written x sigmoid(2 u), which inductor compiles to one exp and one division
where tanh (and erf) are long libdevice polynomials that made the FFN's activation
compute-bound (docs/performance.md); eager, on a CPU, that form is six kernels instead of one
and slowed the quick start's step 1.8x, so it is applied only with compile. Then regional
torch.compile of the code between attention calls, whose
kernels are many and memory-bound: each `AdaptiveLayer` (everything after its attention, to
the next layer's input norm; the layers share one compiled graph, their weights being graph
inputs), `Climber.front` (embeddings, the joint sequence, f_b's bucket ids, 1 / tau) and
`Climber.fuse_and_head` (BGF and the head, some 200 small kernels forward and backward). The
attention kernels and the f_b build stay outside. Shapes start static and turn dynamic at the
first change (torch's automatic dynamic shapes): real batches vary in history length and
candidate count, and one static graph per shape would soon exceed the recompile limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
from contextlib import AbstractContextManager

import torch
from torch import nn

from climber import ops
from climber.config import Runtime


class SigmoidGELU(nn.Module):
    """GELU's tanh form, 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), as x sigmoid(2 u):
    the same function (to fp32 rounding), the form inductor compiles best."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(math.sqrt(8 / math.pi) * x * (1 + 0.044715 * x * x))


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device; plain 'cuda' gets an explicit index (the
    local rank under torchrun, else 0), which torch.cuda.set_device requires."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


MAX_AUTO_THREADS = 4


def cpu_threads(requested: int = 0) -> int:
    """Threads for torch's CPU ops: `requested`, else OMP_NUM_THREADS (torch already obeys it:
    torchrun sets 1), else half the cores, at least 1 and at most MAX_AUTO_THREADS. torch's
    default, a thread per core, is slower for our models on a busy machine: OpenMP threads wait
    for each other at every parallel region, and one that lost its core stalls the rest
    (docs/design.md, CPU threads)."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, min(len(os.sched_getaffinity(0)) // 2, MAX_AUTO_THREADS))


@functools.cache
def _libc():
    """The C library, or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_large_allocations() -> bool:
    """Make glibc serve allocations up to 1 GiB from its heap and keep freed memory, rather than
    mmap and unmap each one (see the module docstring). False where libc is not glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def release_memory() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; elsewhere nothing). The allocator
    keeps the high-water mark of the largest batches (a 2x overload fills batches of max_batch),
    so without this RSS stays up after a burst although nothing is live; trimming costs a few ms,
    so the server does it only when the model has been idle for a second."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def autocast(device: torch.device) -> AbstractContextManager:
    """The precision policy's autocast: bf16 on CUDA, off elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def apply(model: nn.Module, rt: Runtime) -> torch.device:
    """Move `model` to the runtime's device and give it the attention backend, precision and
    compiled regions; returns the device. Baselines get the device and, with compile, one
    compiled forward."""
    device = resolve_device(rt.device)
    if device.type == "cpu":
        keep_large_allocations()
        torch.set_num_threads(cpu_threads(rt.threads))
    model.to(device)
    if hasattr(model, "attention"):  # Climber
        model.attention = ops.backend(rt.attention, device)
        model.stream_dtype = torch.bfloat16 if device.type == "cuda" else None
        if rt.compile:
            for owner in (*model.layers, model.bgf):
                if owner is not None:
                    owner.act = SigmoidGELU()
            for layer in model.layers:
                layer.compile()
            model.front = torch.compile(model.front)
            model.fuse_and_head = torch.compile(model.fuse_and_head)
    elif rt.compile:
        model.compile()
    return device
