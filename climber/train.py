"""Training: one entry point for a laptop CPU, one GPU (bf16 autocast) and `torchrun` (DDP or FSDP2).

`train(data_dir, out_dir, model_cfg, train_cfg, runtime)` runs seeded training on SUMI samples with
AdamW, linear warm-up then cosine decay, per-task BCE over the valid candidates, periodic
validation (AUC/GAUC/LogLoss) of an exponential moving average of the weights (`ema`; best/
holds the average), early stopping on mean validation AUC, and atomic, checksummed
checkpoints (`checkpoint.py`) every `checkpoint_every` steps and every `checkpoint_minutes`.
Run it again on the same `out_dir` and it resumes from the newest intact checkpoint: batches
are a pure function of (seed, epoch, step) and the RNG state is saved, so a killed and resumed
run ends with the same weights as an uninterrupted one. A non-finite loss stops training with
`FloatingPointError` before anything is validated or saved, so the checkpoints on disk stay good.

Under `torchrun`, each rank takes a disjoint shard of every epoch's shuffled requests (on data
prepared with `--shards`, of its own block of shards' requests: its users, one byte range of each
array, `SumiData.rank_parts`, whose events alone it reads, `SumiData.for_rank`), and gradients
are averaged by DDP or reduce-scattered by FSDP2 (`climber/distributed.py`; gloo on CPU, NCCL on
GPU). Under FSDP2 the large embedding tables are built on the meta device and each rank draws
only its block of rows, equal to those rows of a one-process run's init
(`distributed.shard_tables`). Every rank validates its part of the requests and rank 0 computes
the metrics over all of them; rank 0 logs. Checkpoints, `best/` included, are rank 0's (DDP, one
process) or every rank's shards (FSDP2 over several ranks, torch.distributed.checkpoint), which
one process can load whole (`checkpoint.load_model`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from climber import checkpoint, distributed, embeddings
from climber.config import ModelConfig, TrainConfig, from_dict
from climber.data.events import DataError
from climber.data.sumi import SumiData, check_strategies
from climber.extras import MissingDependency, pyplot, require
from climber.files import write_atomic
from climber.metrics import evaluate_predictions
from climber.model import make_model
from climber.runtime import Runtime, autocast, resolve_device
from climber.runtime import apply as apply_runtime


class RequestBatches(torch.utils.data.Dataset):
    """Batch i of an epoch's order; opens the memory-mapped data lazily in each worker, as the
    view of `users` (`SumiData`'s: a rank's reads only its users' events). `negatives` (training
    on implicit data): (per positive, seed words): batch i draws fresh negatives from a generator
    seeded by (*seed words, first + i), a pure function of the batch's place in the run, whichever
    worker builds it and wherever a resume starts."""

    def __init__(self, root: Path, order: np.ndarray, batch_size: int, strategies, seq_len: int,
                 negatives: tuple[int, tuple[int, ...]] | None = None, first: int = 0,
                 users: tuple[int, int] | None = None):
        self.root, self.order, self.bs, self.users = root, order, batch_size, users
        self.strategies, self.seq_len = tuple(strategies), seq_len
        self.negatives, self.first = negatives, first
        self._data: SumiData | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.bs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._data is None:
            self._data = SumiData(self.root, users=self.users)
        neg = None
        if self.negatives is not None:
            n, words = self.negatives
            neg = (n, np.random.default_rng([*words, self.first + i]))
        return self._data.batch(self.order[i * self.bs : (i + 1) * self.bs], self.strategies, self.seq_len, neg)


def loader(data: SumiData, req: np.ndarray, batch_size: int, cfg: ModelConfig, workers: int = 0, pin=False,
           negatives: tuple[int, tuple[int, ...]] | None = None, first: int = 0):
    ds = RequestBatches(data.root, req, batch_size, cfg.strategies, cfg.seq_len, negatives, first, data.users)
    # a private generator: creating an iterator must not draw from the global RNG (dropout's),
    # or a resumed run would diverge from an uninterrupted one
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
                                       prefetch_factor=4 if workers else None, generator=torch.Generator())


def to_device(b: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


def masked_bce(logits: torch.Tensor, b: dict, weights: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Per-task BCE summed over valid candidates and divided by `count` (default: their number,
    a mean), then weighted over tasks."""
    mask = b["cand_mask"][..., None].float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), b["labels"], reduction="none")
    per_task = (loss * mask).sum((0, 1)) / (mask.sum() if count is None else count).clamp(min=1)
    return (per_task * weights).sum()


@torch.no_grad()
def predict(model: torch.nn.Module, data: SumiData, split: str, batch_size: int, device: torch.device,
            workers: int = 0, rank: int = 0, world: int = 1):
    """(users (N,), labels (N, T), probs (N, T)) over every valid candidate of `split`; with
    `world` > 1, over rank `rank`'s part of its requests: its block of shards' (`SumiData.rank_parts`;
    `data` may then be the rank's view, `SumiData.for_rank`), else a contiguous part, so that the
    parts gathered in rank order hold the whole split (in its order, without shards)."""
    model.eval()
    req = data.requests(split)
    parts = data.rank_parts(req, world) or np.array_split(req, world)
    mine = parts[rank]
    users, labels, probs = [], [], []
    n = 0
    for b in loader(data, mine, batch_size, model.cfg, workers):
        b = to_device(b, device)
        with autocast(device):
            p = torch.sigmoid(model(b).float())
        m = b["cand_mask"]
        users.append(b["user"][:, None].expand_as(m)[m].cpu())
        labels.append(b["labels"][m].cpu())
        probs.append(p[m].cpu())
        n += 1
    if distributed.is_sharded(model):  # every rank's forwards gather the same units: as many as the most a rank has
        first = np.searchsorted(data.a["req_user"], data.users[:1])  # a request of the view's first user
        spare = next(iter(loader(data, first, 1, model.cfg)))
        for _ in range(math.ceil(max(map(len, parts)) / batch_size) - n):
            with autocast(device):
                model(to_device(spare, device))
        model.reshard()  # the root unit stays gathered after a forward without backward
    if not users:
        T = len(data.tasks)
        return np.zeros(0, np.int64), np.zeros((0, T), np.float32), np.zeros((0, T), np.float32)
    return torch.cat(users).numpy(), torch.cat(labels).numpy(), torch.cat(probs).numpy()


def build_model(cfg: ModelConfig, data: SumiData, seed: int, meta_tables: bool = False) -> torch.nn.Module:
    """A seeded model with the data's side-feature tables loaded into its buffers. With
    `meta_tables`, the vocabulary tables of more than SMALL_TABLE rows are left on the meta
    device (no memory) for `distributed.shard_tables` to draw each rank's rows; everything else
    is the same as without it."""
    torch.manual_seed(seed)
    with embeddings.meta_tables() if meta_tables else contextlib.nullcontext():
        model = make_model(cfg)
    model.item_features.copy_(torch.from_numpy(np.asarray(data.a["item_features"], dtype=np.int64)))
    model.user_features.copy_(torch.from_numpy(np.asarray(data.a["user_features"], dtype=np.int64)))
    return model


def param_groups(model: torch.nn.Module, weight_decay: float, embedding_lr_mult: float = 1.0,
                 embedding_weight_decay: float = 0.0) -> list[dict]:
    """Weight decay on dense matrices, not on norms, biases or bias tables. Embedding tables
    get their own group, at `embedding_lr_mult` times the learning rate and with
    `embedding_weight_decay` (AdamW's decoupled decay, applied to every row each step)."""
    decay, no_decay, embeddings = [], [], []
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in emb:
            embeddings.append(p)
            continue
        is_matrix = p.ndim >= 2 and not name.endswith(("pos_bias", "time_bias", "log_tau"))
        (decay if is_matrix and "norm" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"params": embeddings, "weight_decay": embedding_weight_decay, "lr_mult": embedding_lr_mult}]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@dataclass
class Run:
    """A training run, set up: what the loop needs."""

    out_dir: Path
    data: SumiData
    model: torch.nn.Module  # unwrapped: checkpoints and validation use it
    step_fn: torch.nn.Module  # what the loop calls: the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    run_config: dict
    device: torch.device
    rank: int
    world: int
    state: dict  # the loop's position and early-stopping record, saved with each checkpoint
    tensorboard: object | None = None  # rank 0's SummaryWriter with `TrainConfig.tensorboard`

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(data_dir: Path, out_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig,
          runtime: Runtime | None = None, progress: bool = True) -> dict:
    """Train (or resume) into `out_dir`; returns a summary with the best validation metrics."""
    runtime = runtime or Runtime()
    run = setup(data_dir, out_dir, model_cfg, cfg, runtime)
    loop(run, progress)
    if not dist.is_initialized():
        return _summary(run.out_dir, run.state)
    dist.barrier()  # rank 0's last files are written before any rank reads them
    summary = _summary(run.out_dir, run.state)
    # the model goes first, while the group lives: DDP's reducer holds the group, and a group
    # destroyed from the reducer's destructor joins gloo's worker thread with the GIL held while
    # that thread may need it to free its last work (a hang seen once at exit, test_distributed)
    del run
    dist.destroy_process_group()
    return summary


def setup(data_dir: Path, out_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig, runtime: Runtime) -> Run:
    """Process group (under torchrun), model on its device with the runtime applied, optimizer,
    and the state of the newest intact checkpoint if `out_dir` holds one (same config required)."""
    device = resolve_device(runtime.device)
    rank, world = distributed.init(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(out_dir)
    # cfg.scenarios: only those scenarios' requests train and validate; with a shard index, a rank
    # reads only its block of shards' events
    data = SumiData(data_dir, cfg.scenarios).for_rank(rank, world)
    check_data(data, model_cfg.strategies, announce=rank == 0)
    run_config = {"model": asdict(model_cfg), "train": asdict(cfg), "runtime": asdict(runtime),
                  "data": str(Path(data_dir).resolve()), "dataset": data.meta["name"], "tasks": list(data.tasks),
                  "data_fingerprint": data.fingerprint, "world": world}
    # under FSDP2 the large tables are built on the meta device and each rank draws its own rows:
    # no large table is ever whole, on the host or the device
    split = runtime.parallel == "fsdp" and world > 1
    model = build_model(model_cfg, data, cfg.seed, meta_tables=split)
    if split:
        distributed.shard_tables(model, world, device)
    apply_runtime(model, runtime)
    step_fn = distributed.parallelize(model, runtime.parallel, world)
    groups = param_groups(model, cfg.weight_decay, cfg.embedding_lr_mult, cfg.embedding_weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    if cfg.ema:
        opt.register_step_post_hook(_average_step(cfg.ema))
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_auc": -1.0, "best_score": -math.inf, "bad_evals": 0,
             "best_step": -1}
    last, skipped = checkpoint.latest_intact(out_dir / "checkpoints")
    if rank == 0:
        for msg in skipped:
            print(f"warning: skipping corrupt checkpoint: {msg}", file=sys.stderr)
    if last is not None:
        _check_resumable(checkpoint.read_config(last), run_config, out_dir)
        ts = checkpoint.load_train_state(last)
        if checkpoint.is_sharded(last) or distributed.is_sharded(model):
            checkpoint.load_into(last, model, opt, ts)
        else:
            model.load_state_dict(checkpoint.load_weights(last, str(device)))
            opt.load_state_dict(ts["optimizer"])
        rng = ts["rng"]  # a sharded save keeps every rank's; a resume on other ranks goes on from rank 0's
        torch.set_rng_state(rng[rank] if isinstance(rng, list) and len(rng) == world else
                            rng[0] if isinstance(rng, list) else rng)
        state = ts["loop"]
        if rank == 0:
            print(f"resuming from {last} (step {state['step']}, epoch {state['epoch']})")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(run_config, indent=2, sort_keys=True) + "\n")
        for name in ("train_log.csv", "valid_log.csv"):  # rows after the resumed step (all, on a fresh start)
            _truncate_log(out_dir / name, state["step"])
    writer = None
    if cfg.tensorboard and rank == 0:  # events after the resumed step are dropped, as the CSV rows are
        tb = require("torch.utils.tensorboard", "tensorboard", "--tensorboard", package="tensorboard")
        writer = tb.SummaryWriter(str(out_dir / "tensorboard"), purge_step=state["step"] + 1 if last else None)
    return Run(out_dir, data, model, step_fn, opt, cfg, run_config, device, rank, world, state, writer)


def check_data(data: SumiData, strategies: tuple[str, ...], announce: bool = True) -> None:
    """Raise DataError where training cannot work (no validation requests, a strategy naming what
    the data lacks); say (`announce`) where validation AUC is undefined: a task whose validation labels
    hold one class. Without any defined AUC the best checkpoint is picked by validation LogLoss."""
    v = data.vocab
    check_strategies(strategies, str(data.root), data.tasks, v["n_scenarios"], v["n_actions"])
    if any(s >= v["n_scenarios"] for s in data.scenarios):
        raise DataError(f"{data.root}: scenarios {data.scenarios} asked for; the data's are 0..{v['n_scenarios'] - 1}")
    k = data.meta["prepare"]["eval_requests"]
    if not len(data.requests("valid")):
        of = f" of scenarios {data.scenarios}" if data.scenarios else ""
        raise DataError(f"{data.root}: no validation requests{of} (a user needs {2 * k + 1} requests or more to have "
                        "validation and test ones); prepare with a smaller --request-gap or --max-candidates")
    one_class = [t for t, col in zip(data.tasks, data.labels("valid").T, strict=True) if col.min() == col.max()]
    if announce and one_class:
        then = ("picking the best checkpoint by validation LogLoss" if len(one_class) == len(data.tasks)
                else "mean AUC is over the other tasks")
        print(f"warning: validation labels of task(s) {one_class} are all one class, so their AUC is undefined; "
              f"{then}", file=sys.stderr)


# what may change when a run resumes: the runtime (device, attention backend, compile), and these,
# which leave the weights alone (eval cadence moves early stopping and best/, not the steps taken)
RESUMABLE = {"num_workers", "log_every", "eval_every", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints",
             "tensorboard"}


def _check_resumable(saved: dict, new: dict, out_dir: Path) -> None:
    """Raise ValueError unless a run saved with config `saved` may go on under `new`: the same
    data (fingerprint) and math; more epochs are fine (the schedule stretches to the new end)."""
    old_fp, new_fp = saved.get("data_fingerprint"), new["data_fingerprint"]
    if old_fp is not None and old_fp != new_fp:
        raise ValueError(f"{out_dir} was trained on other data ({saved['data']}, fingerprint {old_fp}; now "
                         f"{new['data']}, {new_fp}); use another --out or the same data")
    diff = []
    # the global batch (per-rank batch x ranks) is what the math sees: resumed on other ranks, a run
    # may change its per-rank batch to keep it
    same_global = saved.get("world", 1) * saved["train"]["batch_size"] == new["world"] * new["train"]["batch_size"]
    for part, cls in (("model", ModelConfig), ("train", TrainConfig)):
        was = asdict(from_dict(cls, saved[part]))
        for k, v in new[part].items():
            free = part == "train" and (k in RESUMABLE or (k == "epochs" and v > was[k])
                                        or (k == "batch_size" and same_global))
            if v != was[k] and not free:
                diff.append(f"{part}.{k} {was[k]} -> {v}")
    if diff:
        raise ValueError(f"{out_dir} holds a run with a different config ({', '.join(diff)}); "
                         "use another --out or delete it")


def loop(run: Run, progress: bool = True) -> None:
    """Optimizer steps from `run.state` on, validating, checkpointing and stopping early as the
    config says. Batches are a pure function of (seed, epoch, step), so a resumed run continues
    exactly where the checkpoint left off."""
    cfg, data, state, device = run.cfg, run.data, run.state, run.device
    model_cfg = run.model.cfg
    train_req = data.requests("train")
    # with a shard index each rank trains on its own block of shards' requests, every epoch as many
    # as the rank with the fewest has (the others leave out a random few); else on a strided part
    # of one global order (leaving out len % world)
    parts = data.rank_parts(train_req, run.world)
    per_rank = len(train_req) // run.world if parts is None else min(map(len, parts))
    steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    eval_every = cfg.eval_every or max(1, steps_per_epoch // 2)
    ckpt_every = cfg.checkpoint_every or eval_every
    weights = torch.tensor(cfg.task_weights or [1.0 / len(data.tasks)] * len(data.tasks), device=device)
    log_path = run.out_dir / "train_log.csv"
    bar = tqdm(total=total, initial=state["step"], disable=not (run.main and progress), desc="train", unit="step")
    t0 = last_save = time.time()
    nonfinite = torch.zeros((), device=device)  # steps with a non-finite loss; read at checks, a host sync

    while state["step"] < total and not state.get("stopped"):
        epoch = state["epoch"]
        rng = np.random.default_rng([cfg.seed, epoch])
        if parts is None:  # one order for all: a step's batches on the ranks are a global batch's strided parts
            order, chunk = rng.permutation(train_req), cfg.batch_size * run.world
        else:  # the rank's own: a random per_rank of its requests
            order, chunk = rng.permutation(parts[run.rank])[:per_rank], cfg.batch_size
        if cfg.bucket_window:  # (global) batches of similar history lengths
            order = data.bucket_by_length(order, chunk, cfg.bucket_window, model_cfg.seq_len,
                                          np.random.default_rng([cfg.seed, epoch, 1]))
        shard = order[run.rank::run.world][:per_rank] if parts is None else order
        negatives = (cfg.train_negatives, (cfg.seed, epoch, run.rank, 2)) if data.implicit else None
        batches = loader(data, shard[state["step_in_epoch"] * cfg.batch_size :], cfg.batch_size, model_cfg,
                         cfg.num_workers, pin=device.type == "cuda", negatives=negatives,
                         first=state["step_in_epoch"])
        run.model.train()
        for b in batches:
            b = to_device(b, device)
            for g in run.opt.param_groups:
                g["lr"] = lr_at(state["step"], total, cfg) * g.get("lr_mult", 1.0)
            # each rank divides by the global batch's candidate count over the world size, so that
            # the gradients' mean over ranks is the global batch's (as on one process); without it,
            # a rank with fewer candidates would weigh each of them more
            count = b["cand_mask"].sum().float()
            if run.world > 1:
                count = distributed.global_sum(count) / run.world
            with autocast(device):
                loss = masked_bce(run.step_fn(b), b, weights, count)
            nonfinite += ~torch.isfinite(loss.detach())
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
            run.opt.step()
            state["step"] += 1
            state["step_in_epoch"] += 1
            if state["step_in_epoch"] >= steps_per_epoch:
                state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == 1:
                lv = distributed.global_sum(loss.detach()).item() / run.world  # the global batch's loss
            if run.main and (state["step"] % cfg.log_every == 0 or state["step"] == 1):
                bar.set_postfix(loss=f"{lv:.4f}")
                _log(log_path, {"step": state["step"], "epoch": epoch, "split": "train", "loss": lv,
                                "lr": run.opt.param_groups[0]["lr"], "elapsed_s": time.time() - t0}, run.tensorboard)
            at_end = state["step"] >= total
            validate = state["step"] % eval_every == 0 or at_end
            save = state["step"] % ckpt_every == 0 or at_end
            if validate or save or state["step"] % cfg.log_every == 0:
                late = bool(cfg.checkpoint_minutes) and time.time() - last_save >= 60 * cfg.checkpoint_minutes
                diverged, late = _agree(device, nonfinite > 0, late)
                if diverged:
                    bar.close()
                    raise FloatingPointError(
                        f"training loss is not finite (nan or inf) by step {state['step']}; stopped before "
                        f"saving, so {run.out_dir / 'checkpoints'} keeps the last good checkpoint. Lower --lr "
                        "or --grad-clip, or check the data")
                save = save or late
            if validate:
                with averaged_weights(run):
                    _validate(run, epoch)
            if save or state.get("stopped"):
                save_checkpoint(run)
                last_save = time.time()
            if at_end or state.get("stopped") or state["step_in_epoch"] == 0:
                break
    bar.close()
    if run.tensorboard is not None:
        run.tensorboard.close()
    if run.main:
        plot_curves(run.out_dir)


def _average_step(decay: float):
    """An optimizer step hook keeping an exponential moving average of every parameter in its
    optimizer state, as `"ema"` (the sum of (1 - decay) decay^(t-i) w_i over the steps i so far,
    from zeros): checkpoints, DCP's shards and a resume carry it as they carry AdamW's moments."""

    def update(opt: torch.optim.Optimizer, args, kwargs) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        states = [opt.state[p] for p in params]
        if "ema" not in states[0]:  # the first step (every parameter's, or a resumed run's, is there after)
            for s, p in zip(states, params, strict=True):
                s["ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        averages = [s["ema"] for s in states]
        with torch.no_grad():
            torch._foreach_lerp_(_local(averages), _local(params), 1 - decay)

    return update


@contextlib.contextmanager
def averaged_weights(run: Run):
    """With `TrainConfig.ema`, the model holds the average of its weights inside the block (scaled
    by 1 / (1 - decay^steps), so no weight of the zero start remains) and its live weights again
    after it; without, a no-op."""
    if not run.cfg.ema or run.state["step"] == 0:
        yield
        return
    params = [p for g in run.opt.param_groups for p in g["params"]]
    averages = _local([run.opt.state[p]["ema"] for p in params])
    with torch.no_grad():
        params = _local(params)
        live = [p.clone() for p in params]
        torch._foreach_copy_(params, averages)
        torch._foreach_div_(params, 1 - run.cfg.ema ** run.state["step"])
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, live)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's local part (its shard, for an FSDP2 DTensor; itself otherwise), detached: the
    foreach ops above have no DTensor sharding rules, and each rank averages its own shard."""
    return [t.to_local().detach() if isinstance(t, DTensor) else t.detach() for t in tensors]


def _agree(device: torch.device, *flags) -> list[bool]:
    """Each flag, true on every rank if it is true on any (under torchrun), so ranks stop and
    checkpoint together; one host sync."""
    t = torch.stack([torch.as_tensor(f, device=device) for f in flags]).int()
    if dist.is_initialized():
        dist.all_reduce(t, dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def save_checkpoint(run: Run) -> None:
    """The model, optimizer, RNG and loop state as checkpoints/step-N, the oldest pruned. With
    `--parallel fsdp` every rank writes its shards (torch.distributed.checkpoint); otherwise rank
    0 writes the whole state (safetensors and train_state.pt)."""
    root = run.out_dir / "checkpoints"
    path = root / f"{checkpoint.STEP_PREFIX}{run.state['step']:08d}"
    if run.run_config["runtime"]["parallel"] == "fsdp":
        rng = [torch.empty_like(torch.get_rng_state()) for _ in range(run.world)]
        if dist.is_initialized():
            dist.all_gather(rng, torch.get_rng_state())
        else:
            rng = [torch.get_rng_state()]
        checkpoint.save_sharded(path, run.model, run.opt, run.run_config, {"rng": rng, "loop": dict(run.state)})
    elif run.main:
        checkpoint.save(path, run.model, run.run_config,
                        {"optimizer": run.opt.state_dict(), "rng": torch.get_rng_state(), "loop": dict(run.state)})
    if run.main:
        checkpoint.prune(root, run.cfg.keep_checkpoints)
    if dist.is_initialized():
        dist.barrier()


def _validate(run: Run, epoch: int) -> None:
    """Validation on every rank, each scoring its part of the requests; rank 0 gathers the
    predictions and computes the metrics once, over all of them (exact global AUC and GAUC).
    The best model is saved as best/ (whole in safetensors; each rank's shards with DCP when
    the model is sharded over ranks), and training stops early after `patience` validations
    without a gain; every rank learns both."""
    state = run.state
    preds = predict(run.model, run.data, "valid", run.cfg.batch_size * 2, run.device, rank=run.rank, world=run.world)
    preds = distributed.gather(*preds)
    improved = False
    if run.main:
        res = evaluate_predictions(*preds, run.data.tasks)
        auc = res["mean"]["auc"]
        score = -res["mean"]["logloss"] if math.isnan(auc) else auc  # AUC undefined: one-class labels
        row = {"step": state["step"], "epoch": epoch, "split": "valid", **{f"{t}_{k}": v for t, r in res.items()
                                                                           for k, v in r.items()}}
        _log(run.out_dir / "valid_log.csv", row, run.tensorboard)
        if score > state.get("best_score", state["best_auc"]):
            state.update(best_score=score, best_auc=auc, bad_evals=0, best_step=state["step"], best_valid=res)
            improved = True
        else:
            state["bad_evals"] += 1
            if state["bad_evals"] >= run.cfg.patience:
                state["stopped"] = True
        tqdm.write(f"step {state['step']}: valid AUC {auc:.4f} GAUC {res['mean']['gauc']:.4f} "
                   f"LogLoss {res['mean']['logloss']:.4f} (best {state['best_auc']:.4f})")
    run.model.train()
    improved, stopped = distributed.broadcast_flags(run.device, improved, bool(state.get("stopped")))
    state["stopped"] = stopped
    if improved and distributed.is_sharded(run.model):  # every rank writes its shards: no rank holds the model
        checkpoint.save_sharded(run.out_dir / "best", run.model, None, run.run_config)
    elif improved and run.main:
        checkpoint.save(run.out_dir / "best", run.model, run.run_config)


def _log(path: Path, row: dict, tensorboard=None) -> None:
    """Append a row to a CSV (one file per kind of row, so its columns are fixed); with a
    SummaryWriter, its numbers also as scalars `<split>/<column>` at its step."""
    if tensorboard is not None:
        for k, v in row.items():
            if k not in ("step", "epoch", "split") and isinstance(v, float | int) and not math.isnan(v):
                tensorboard.add_scalar(f"{row['split']}/{k}", v, row["step"])
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot_curves(out_dir: Path) -> Path | None:
    """curves.png in the run directory: training loss and validation mean AUC / GAUC by step, from
    the CSV logs. Only where matplotlib is installed (the [plot] extra): training needs no plots."""
    try:
        plt = pyplot("the training-curve plot")
    except MissingDependency:
        return None
    train_rows, valid_rows = (_read_log(out_dir / f"{k}_log.csv") for k in ("train", "valid"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], lw=1)
    a1.set(xlabel="step", ylabel="training loss (BCE)")
    for k in ("mean_auc", "mean_gauc"):
        a2.plot([r["step"] for r in valid_rows], [r.get(k, math.nan) for r in valid_rows], marker="o", label=k[5:])
    a2.set(xlabel="step", ylabel="validation (mean over tasks)")
    a2.legend()
    fig.suptitle(out_dir.name)
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in r.items() if k != "split"} for r in csv.DictReader(f)]


def _truncate_log(path: Path, step: int) -> None:
    """On (re)start, drop the rows logged after the step we start from (they will be redone) and
    a last line cut short by a kill; rewritten atomically, so a kill meanwhile loses nothing."""
    if not path.exists():
        return
    text = path.read_text()
    lines = text[: text.rfind("\n") + 1].splitlines(keepends=True)  # whole lines only
    keep = lines[:1] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= step]
    if len(keep) > 1:
        write_atomic(path, "".join(keep))
    else:  # no row left (or not even a whole header): the next row writes a fresh header
        path.unlink()


def _summary(out_dir: Path, state: dict) -> dict:
    return {"out_dir": str(out_dir), "steps": state["step"], "best_step": state["best_step"],
            "best_valid_auc": state["best_auc"], "best_valid": state.get("best_valid"),
            "early_stopped": bool(state.get("stopped"))}
