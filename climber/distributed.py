"""Data parallelism, applied to a built model from outside (as torchtitan's `parallelize`): the
process group under `torchrun`, DDP or FSDP2, and the collectives that training's validation and
checkpoints need. The model file knows nothing of it.

`Runtime.parallel`:
- "ddp": every rank holds the whole model and optimizer; DDP all-reduces the gradients.
- "fsdp": `torch.distributed.fsdp.fully_shard` (FSDP2) for the dense parameters and small
  tables: each becomes a DTensor sharded on dim 0 over the ranks (`Shard(0)`); gradients are
  reduce-scattered and AdamW's state exists only for the local part. Each layer's maps are their
  own units (gathered just before use, freed after); the rest (small tables, biases, fusion,
  head) is the root unit, gathered for the whole step. The vocabulary tables (`Table`: items,
  side features) of more than SMALL_TABLE rows are not FSDP2's: `shard_tables` splits each by
  rows (`RowShardedTable`, a `Shard(0)` DTensor in no unit), so a rank only ever holds its block
  of rows, their gradient and their AdamW moments, and a lookup moves the looked-up rows, not the
  table (all-gather the ids, look up the owned rows, reduce-scatter; docs/performance.md). DCP saves
  and reshards both kinds alike. Precision is as under DDP: fp32 weights and optimizer state,
  bf16 autocast on CUDA.

  No rank ever holds a whole large table: training builds the model with those tables on the
  meta device (`embeddings.meta_tables`) and `shard_tables` draws only the rank's rows of each
  (`Table.init_rows`), the numbers that the same rows of the whole table built by one process
  have for the same seed; so a run's start does not depend on how many ranks it has.

With world size 1 (no `torchrun`) nothing is wrapped: "fsdp" then only picks the checkpoint
format (torch.distributed.checkpoint, `climber/checkpoint.py`), so a run can move between one
process and several.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from climber.embeddings import SMALL_TABLE, Table

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
    (the DDP wrapper, or `model` itself, sharded in place). Call after `runtime.apply` (the
    device) and before building the optimizer (FSDP2 replaces the parameters). Under "fsdp", call
    `shard_tables` before `runtime.apply`, so that no table is ever whole on the device; done
    here otherwise."""
    if world == 1:
        return model
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    device = next(p.device for p in model.parameters() if not isinstance(p, DTensor))
    mesh = shard_tables(model, world, device)
    # A unit's parameters are gathered by its forward hooks, so a unit must be a module that is
    # called (not one whose weights are read by its parent): each map of a layer is, while
    # Climber calls its layer's qkv outside the layer's forward (climber/model.py, `encode`).
    for layer in getattr(model, "layers", ()):
        for child in layer.children():
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh)
    # the row-sharded tables are in no unit: nothing gathers them
    rows = {m.weight for m in model.modules() if isinstance(m, RowShardedTable)}
    fully_shard(model, mesh=mesh, ignored_params=rows)
    return model


def shard_tables(model: nn.Module, world: int, device: torch.device):
    """Split every `Table` of more than SMALL_TABLE rows over the ranks, in place (each becomes
    a `RowShardedTable` holding its block of rows on `device`); returns the ranks' device mesh.
    A table on the meta device (`embeddings.meta_tables`) gets its block's init drawn, one built
    whole is sliced; every rank must have built the same model (the same seed). A
    collective-free no-op for tables already split."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = next((m.weight.device_mesh for m in model.modules() if isinstance(m, RowShardedTable)), None)
    mesh = mesh or init_device_mesh(device.type, (world,))
    for name, m in model.named_modules():
        if type(m) is Table and m.num_embeddings > SMALL_TABLE:
            RowShardedTable.split(m, name, mesh)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"parameters {left} are on the meta device and are not tables that shard_tables splits")
    return mesh


class RowShardedTable(Table):
    """A `Table` whose rows are split over the ranks: the weight is a DTensor sharded on dim 0
    (`Shard(0)`: rank r holds rows [r c, (r + 1) c), c = ceil(rows / world), as `torch.chunk`
    splits), so its gradient and AdamW's moments exist only for those rows, and
    torch.distributed.checkpoint saves and reshards it like FSDP2's parameters.

    A lookup is a collective (every rank calls it, with its own ids, as many times): the ranks'
    ids are all-gathered (padded to the largest count), each rank reads the rows it owns (zero
    for the others), and a reduce-scatter sums the parts and returns to each rank the rows of
    its own ids. Backward runs the same path in reverse through DTensor's autograd: the output
    gradients are all-gathered and each rank adds into its own rows only, the sum over every
    rank's batch, scaled by 1 / world: the mean over ranks, as DDP and FSDP2 average the dense
    gradients. Per lookup of n ids a rank sends and receives about world x n x d numbers
    (docs/performance.md). An id outside the table raises IndexError on every rank at once."""

    @staticmethod
    def split(table: Table, name: str, mesh) -> None:
        """Turn `table` into a `RowShardedTable` in place (as FSDP2 swaps a module's class)."""
        from torch.distributed.tensor import DTensor, Shard

        world, rank = mesh.size(), mesh.get_local_rank()
        rows, d = table.weight.shape
        per = -(-rows // world)
        if per * (world - 1) >= rows:
            raise ValueError(f"table {name} has {rows} rows, too few to split over {world} ranks")
        if table.weight.is_meta:  # built by `meta_tables`: draw this rank's rows alone
            mine = table.init_rows(rank * per, min((rank + 1) * per, rows), mesh.device_type)
        else:
            mine = table.weight.detach()[rank * per:(rank + 1) * per].to(mesh.device_type).clone()
        w = DTensor.from_local(mine, mesh, [Shard(0)], run_check=False, shape=(rows, d),
                               stride=(d, 1))
        table.__class__ = RowShardedTable
        table.weight = nn.Parameter(w, requires_grad=table.weight.requires_grad)
        table.name, table.mesh, table.offset = name, mesh, rank * per

    @torch.compiler.disable  # data-dependent sizes and collectives: run eagerly inside a compiled region
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., d)
        flat = ids.reshape(-1)
        all_ids, n_max = self._gather(flat)
        w = self.weight.to_local()  # (rows of this rank, d)
        local = all_ids - self.offset
        own = (local >= 0) & (local < len(w))
        pad = self.padding_idx - self.offset if self.padding_idx is not None else -1
        rows = F.embedding(local.clamp(0, len(w) - 1), w, pad if 0 <= pad < len(w) else None)
        rows = rows * own[:, None].to(rows.dtype)  # (world * n_max, d), zero where another rank owns the id
        return self._scatter(rows, n_max)[: len(flat)].view(*ids.shape, self.embedding_dim)

    @torch.compiler.disable
    def bag_mean(self, codes: torch.Tensor) -> torch.Tensor:
        """`Table.bag_mean`: each rank sums, per bag, the rows it owns (`F.embedding_bag` with 0/1
        weights), the reduce-scatter adds the ranks' sums, and each rank divides by its bags' sizes."""
        x = codes.reshape(-1, codes.shape[-1])  # (n, w)
        all_x, n_max = self._gather(x)
        w = self.weight.to_local()
        local = all_x - self.offset
        own = (all_x != 0) & (local >= 0) & (local < len(w))
        sums = F.embedding_bag(local.clamp(0, len(w) - 1), w, mode="sum", per_sample_weights=own.to(w.dtype))
        size = (x != 0).sum(-1, keepdim=True).clamp(min=1)
        return (self._scatter(sums, n_max)[: len(x)] / size).view(*codes.shape[:-1], self.embedding_dim)

    def _gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every rank's ids x (n, ...), padded with zeros to the largest n and concatenated in rank
        order: (world * n_max, ...), and n_max. Raises IndexError, on every rank alike, where an
        id is outside the table."""
        world = self.mesh.size()
        stats = torch.stack([torch.tensor(len(x), device=x.device), x.min() if x.numel() else x.new_zeros(()),
                             x.max() if x.numel() else x.new_zeros(())])
        counts, lo, hi = _all_gather(stats[None], self.mesh).T.tolist()  # (world, 3), to the host
        bad = [r for r in range(world) if counts[r] and (lo[r] < 0 or hi[r] >= self.num_embeddings)]
        if bad:
            r = bad[0]
            raise IndexError(f"{self.name}: id out of range (rank {r}'s batch has ids in [{lo[r]}, {hi[r]}]; the "
                             f"table has {self.num_embeddings} rows, ids 0..{self.num_embeddings - 1}); does the "
                             "data match the model's vocabulary?")
        n_max = max(counts)
        padded = F.pad(x, (0,) * (2 * x.dim() - 1) + (n_max - len(x),))
        return _all_gather(padded, self.mesh), n_max

    def _scatter(self, parts: torch.Tensor, n_max: int) -> torch.Tensor:
        """Every rank's partial rows (world * n_max, d) -> this rank's n_max rows, summed over the
        ranks (a reduce-scatter; its backward all-gathers the gradient, scaled by 1 / world)."""
        from torch.distributed.tensor import DTensor, Partial, Shard

        world = self.mesh.size()
        p = DTensor.from_local(_ScaleGrad.apply(parts, 1 / world), self.mesh, [Partial()], run_check=False)
        return p.redistribute(self.mesh, [Shard(0)]).to_local()


def _all_gather(x: torch.Tensor, mesh) -> torch.Tensor:
    """Every rank's x (n, ...), the same n on each, concatenated in rank order (world * n, ...)."""
    from torch.distributed.tensor import Shard

    return DTensor.from_local(x, mesh, [Shard(0)], run_check=False).full_tensor()


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


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
