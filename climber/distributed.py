"""Data parallelism, applied to a built model from outside (as torchtitan's `parallelize`): the
process group under `torchrun`, DDP or FSDP2, and the collectives that training's validation and
checkpoints need. The model file knows nothing of it.

`Runtime.parallel`:
- "ddp": every rank holds the whole model and optimizer; DDP all-reduces the gradients.
- "fsdp": `torch.distributed.fsdp.fully_shard` (FSDP2). Every parameter becomes a DTensor
  sharded on dim 0 over the ranks (`Shard(0)`), embedding tables included, which is a row-wise
  split; gradients are reduce-scattered and AdamW's state exists only for the local rows. Each
  layer's maps are their own units (gathered just before use, freed after); the rest (embedding
  tables, biases, fusion, head) is the root unit, gathered for the whole step. Precision is
  today's: fp32 weights and optimizer state, bf16 autocast on CUDA (docs/design.md).

With world size 1 (no `torchrun`) nothing is wrapped: "fsdp" then only picks the checkpoint
format (torch.distributed.checkpoint, `climber/checkpoint.py`), so a run can move between one
process and several.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("ddp", "fsdp")


def init(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun (WORLD_SIZE > 1) the process group is started first:
    NCCL on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was wrapped by `fully_shard` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def parallelize(model: nn.Module, parallel: str, world: int) -> nn.Module:
    """Wrap `model` for data parallelism over `world` ranks; returns what the training step calls
    (the DDP wrapper, or `model` itself, sharded in place by FSDP2). Call after `runtime.apply`
    (the device) and before building the optimizer (FSDP2 replaces the parameters)."""
    if world == 1:
        return model
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    # A unit's parameters are gathered by its forward hooks, so a unit must be a module that is
    # called (not one whose weights are read by its parent): each map of a layer is, while
    # Climber calls its layer's qkv outside the layer's forward (climber/model.py, `encode`).
    for layer in getattr(model, "layers", ()):
        for child in layer.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
    fully_shard(model)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, on the CPU, on rank 0 (empty elsewhere). A collective for
    a sharded model: every rank calls it."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shard(items: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s contiguous part of `items` (sizes differ by at most one), so that the
    parts gathered in rank order are `items` again."""
    return np.array_split(items, world)[rank]


def gather(*arrays: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """Each array concatenated over the ranks in rank order, on rank 0; None on the others."""
    if not dist.is_initialized():
        return arrays
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(arrays, parts, dst=0)
    if parts is None:
        return None
    return tuple(np.concatenate(cols) for cols in zip(*parts, strict=True))


def broadcast_flags(device: torch.device, *flags: bool) -> list[bool]:
    """Rank 0's flags on every rank."""
    t = torch.tensor([int(f) for f in flags], device=device)
    if dist.is_initialized():
        dist.broadcast(t, 0)
    return [bool(x) for x in t.tolist()]


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over the ranks (a new tensor; x itself on one process)."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x
