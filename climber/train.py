"""Training: one entry point for a laptop CPU, one GPU (bf16 autocast) and `torchrun` (DDP).

`train(data_dir, out_dir, model_cfg, train_cfg)` runs seeded training on SUMI samples with
AdamW, linear warm-up then cosine decay, per-task BCE over the valid candidates, periodic
validation (AUC/GAUC/LogLoss), early stopping on mean validation AUC, and atomic checkpoints
(`checkpoint.py`). Run it again on the same `out_dir` and it resumes from the last
checkpoint: batches are a pure function of (seed, epoch, step) and the RNG state is saved,
so a killed and resumed run ends with the same weights as an uninterrupted one.

Under `torchrun`, each rank takes a disjoint shard of every epoch's shuffled requests and
gradients are averaged by DDP (gloo on CPU, NCCL on GPU); rank 0 validates, logs and saves.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from climber import checkpoint
from climber.config import ModelConfig, TrainConfig
from climber.data.sumi import SumiData
from climber.metrics import evaluate_predictions
from climber.model import make_model


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device; plain 'cuda' gets an explicit index (the
    local rank under torchrun, else 0), which torch.cuda.set_device requires."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


class RequestBatches(torch.utils.data.Dataset):
    """Batch i of an epoch's order; opens the memory-mapped data lazily in each worker."""

    def __init__(self, root: Path, order: np.ndarray, batch_size: int, strategies, seq_len: int):
        self.root, self.order, self.bs = root, order, batch_size
        self.strategies, self.seq_len = tuple(strategies), seq_len
        self._data: SumiData | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.bs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._data is None:
            self._data = SumiData(self.root)
        return self._data.batch(self.order[i * self.bs : (i + 1) * self.bs], self.strategies, self.seq_len)


def loader(data: SumiData, req: np.ndarray, batch_size: int, cfg: ModelConfig, workers: int = 0, pin=False):
    ds = RequestBatches(data.root, req, batch_size, cfg.strategies, cfg.seq_len)
    # a private generator: creating an iterator must not draw from the global RNG (dropout's),
    # or a resumed run would diverge from an uninterrupted one
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
                                       prefetch_factor=4 if workers else None, generator=torch.Generator())


def to_device(b: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


def masked_bce(logits: torch.Tensor, b: dict, weights: torch.Tensor) -> torch.Tensor:
    """Per-task BCE averaged over valid candidates, then weighted over tasks."""
    mask = b["cand_mask"][..., None].float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), b["labels"], reduction="none")
    per_task = (loss * mask).sum((0, 1)) / mask.sum().clamp(min=1)
    return (per_task * weights).sum()


@torch.no_grad()
def predict(model: torch.nn.Module, data: SumiData, split: str, batch_size: int, device: torch.device,
            workers: int = 0):
    """(users (N,), labels (N, T), probs (N, T)) over every valid candidate of `split`."""
    model.eval()
    cfg = model.cfg
    users, labels, probs = [], [], []
    amp = device.type == "cuda"
    for b in loader(data, data.requests(split), batch_size, cfg, workers):
        b = to_device(b, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            p = torch.sigmoid(model(b).float())
        m = b["cand_mask"]
        users.append(b["user"][:, None].expand_as(m)[m].cpu())
        labels.append(b["labels"][m].cpu())
        probs.append(p[m].cpu())
    return torch.cat(users).numpy(), torch.cat(labels).numpy(), torch.cat(probs).numpy()


def build_model(cfg: ModelConfig, data: SumiData, seed: int) -> torch.nn.Module:
    """A seeded model with the data's side-feature tables loaded into its buffers."""
    torch.manual_seed(seed)
    model = make_model(cfg)
    model.item_features.copy_(torch.from_numpy(np.asarray(data.a["item_features"], dtype=np.int64)))
    model.user_features.copy_(torch.from_numpy(np.asarray(data.a["user_features"], dtype=np.int64)))
    return model


def param_groups(model: torch.nn.Module, weight_decay: float, embedding_lr_mult: float = 1.0) -> list[dict]:
    """Weight decay on dense matrices only; not on embeddings, norms, biases or bias tables.
    Embedding tables get their own group, at `embedding_lr_mult` times the learning rate."""
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
            {"params": embeddings, "weight_decay": 0.0, "lr_mult": embedding_lr_mult}]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train(data_dir: Path, out_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume) into `out_dir`; returns a summary with the best validation metrics."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(cfg.device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    main = rank == 0
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    data = SumiData(data_dir)
    run_config = {"model": asdict(model_cfg), "train": asdict(cfg), "data": str(Path(data_dir).resolve()),
                  "dataset": data.meta["name"], "tasks": list(data.tasks)}

    model = build_model(model_cfg, data, cfg.seed).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.embedding_lr_mult), lr=cfg.lr, betas=(0.9, 0.98),
                            fused=device.type == "cuda")
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_auc": -1.0, "bad_evals": 0, "best_step": -1}
    last = checkpoint.latest_step_dir(ckpt_root)
    if last is not None:
        saved = checkpoint.read_config(last)
        now = json.loads(json.dumps(run_config))  # tuples -> lists, as saved
        if saved["model"] != now["model"] or saved["train"] != now["train"]:
            raise ValueError(f"{out_dir} holds a run with a different config; use another --out or delete it")
        model.load_state_dict(load_file(last / "model.safetensors"))
        ts = checkpoint.load_train_state(last)
        opt.load_state_dict(ts["optimizer"])
        torch.set_rng_state(ts["rng"])
        state = ts["loop"]
        if main:
            for name in ("train_log.csv", "valid_log.csv"):
                _truncate_log(out_dir / name, state["step"])
            print(f"resuming from {last} (step {state['step']}, epoch {state['epoch']})")
    elif main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(run_config, indent=2, sort_keys=True) + "\n")
    if state.get("done"):
        return _summary(out_dir, state)

    ddp = DistributedDataParallel(model) if distributed else model
    step_fn = ddp
    if cfg.compile and hasattr(model, "compile_layers"):  # Climber: regional, per layer
        model.compile_layers()
    elif cfg.compile:
        step_fn = torch.compile(ddp)
    train_req = data.requests("train")
    steps_per_epoch = math.ceil(len(train_req) // world / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    eval_every = cfg.eval_every or steps_per_epoch
    ckpt_every = cfg.checkpoint_every or eval_every
    weights = torch.tensor(cfg.task_weights or [1.0 / len(data.tasks)] * len(data.tasks), device=device)
    amp = device.type == "cuda"
    log_path = out_dir / "train_log.csv"
    bar = tqdm(total=total, initial=state["step"], disable=not (main and progress), desc="train", unit="step")
    t0 = time.time()

    while state["step"] < total and not state.get("stopped"):
        epoch = state["epoch"]
        order = np.random.default_rng([cfg.seed, epoch]).permutation(train_req)
        if cfg.bucket_window:  # global batches (batch_size x world) of similar history lengths
            order = data.bucket_by_length(order, cfg.batch_size * world, cfg.bucket_window, model_cfg.seq_len,
                                          np.random.default_rng([cfg.seed, epoch, 1]))
        shard = order[rank::world][: len(order) // world]
        batches = loader(data, shard[state["step_in_epoch"] * cfg.batch_size :], cfg.batch_size, model_cfg,
                         cfg.num_workers, pin=amp)
        model.train()
        for b in batches:
            b = to_device(b, device)
            for g in opt.param_groups:
                g["lr"] = lr_at(state["step"], total, cfg) * g.get("lr_mult", 1.0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = masked_bce(step_fn(b), b, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            state["step"] += 1
            state["step_in_epoch"] += 1
            if state["step_in_epoch"] >= steps_per_epoch:
                state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            bar.update(1)
            if main and (state["step"] % cfg.log_every == 0 or state["step"] == 1):
                lv = loss.item()  # the only host sync of the step, every log_every steps
                bar.set_postfix(loss=f"{lv:.4f}")
                _log(log_path, {"step": state["step"], "epoch": epoch, "split": "train", "loss": lv,
                                "lr": opt.param_groups[0]["lr"], "elapsed_s": time.time() - t0})
            at_end = state["step"] >= total
            if state["step"] % eval_every == 0 or at_end:
                _validate(model, data, cfg, device, state, out_dir, run_config, main, epoch)
            if state["step"] % ckpt_every == 0 or at_end or state.get("stopped"):
                state["done"] = at_end or bool(state.get("stopped"))
                if main:
                    checkpoint.save(ckpt_root / f"{checkpoint.STEP_PREFIX}{state['step']:08d}", model, run_config,
                                    {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "loop": dict(state)})
                    checkpoint.prune(ckpt_root, cfg.keep_checkpoints)
                if distributed:
                    dist.barrier()
            if at_end or state.get("stopped"):
                break
            if state["step_in_epoch"] == 0:
                break
    bar.close()
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return _summary(out_dir, state)


def _validate(model, data, cfg, device, state, out_dir, run_config, main, epoch) -> None:
    if main:
        users, labels, probs = predict(model, data, "valid", cfg.batch_size * 2, device)
        res = evaluate_predictions(users, labels, probs, data.tasks)
        auc = res["mean"]["auc"]
        row = {"step": state["step"], "epoch": epoch, "split": "valid", **{f"{t}_{k}": v for t, r in res.items()
                                                                           for k, v in r.items()}}
        _log(out_dir / "valid_log.csv", row)
        if auc > state["best_auc"]:
            state.update(best_auc=auc, bad_evals=0, best_step=state["step"], best_valid=res)
            checkpoint.save(out_dir / "best", model, run_config)
        else:
            state["bad_evals"] += 1
            if state["bad_evals"] >= cfg.patience:
                state["stopped"] = True
        tqdm.write(f"step {state['step']}: valid AUC {auc:.4f} GAUC {res['mean']['gauc']:.4f} "
                   f"LogLoss {res['mean']['logloss']:.4f} (best {state['best_auc']:.4f})")
        model.train()
    if dist.is_initialized():  # every rank learns whether to stop
        flag = torch.tensor([int(bool(state.get("stopped")))], device=device)
        dist.broadcast(flag, 0)
        state["stopped"] = bool(flag.item())


def _log(path: Path, row: dict) -> None:
    """Append a row to a CSV (one file per kind of row, so its columns are fixed)."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint we resume from (they will be redone)."""
    if path.exists():
        with path.open() as f:
            rows = list(csv.DictReader(f))
        if rows:
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(r for r in rows if int(r["step"]) <= step)


def _summary(out_dir: Path, state: dict) -> dict:
    return {"out_dir": str(out_dir), "steps": state["step"], "best_step": state["best_step"],
            "best_valid_auc": state["best_auc"], "best_valid": state.get("best_valid"),
            "early_stopped": bool(state.get("stopped"))}
