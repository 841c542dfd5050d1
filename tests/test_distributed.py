"""Sharded training on 2 gloo processes (CPU): FSDP2 with row-sharded embedding tables built on
the meta device and DDP equal one process, a rank's rows of a table equal those rows of the
whole init and no rank makes a tensor as large as the whole table, DCP checkpoints (best/
included) resume or load on another number of ranks, validation on every rank equals validation
on one, and the sharded lookup equals `F.embedding` on the whole table; on data prepared with
`--shards`, each rank trains and validates on its own block of shards' users only, and its view of
the data builds the same batches as the whole data's while reading none of the other users' events."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from climber import checkpoint, distributed
from climber.config import TrainConfig, model_config
from climber.data.events import DataError
from climber.data.sumi import TRAIN as TRAIN_SPLIT
from climber.data.sumi import VALID, PrepareConfig, SumiData, prepare
from climber.embeddings import INIT_BLOCK, SMALL_TABLE, Table, meta_tables
from climber.metrics import evaluate_predictions
from climber.model import make_model
from climber.runtime import Runtime
from climber.train import build_model, loader, predict, train
from tests.helpers import random_batch, synthetic_log, tiny_config

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("recent", "pos:like", "recent@4")
STEPS, SAVE = 20, 10
# one process with batch 16 sees, step by step, the requests that 2 ranks with batch 8 see;
# dropout off, as each rank would draw its own masks
TRAIN = {"epochs": 2, "max_steps": STEPS, "lr": 3e-3, "warmup_steps": 5, "log_every": 1, "checkpoint_every": SAVE,
         "eval_every": SAVE, "keep_checkpoints": 10, "patience": 100, "ema": 0.0}  # best/: a step's weights


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "synthetic"
    prepare(synthetic_log(n_users=29, n_items=300), d, PrepareConfig(request_gap=50, max_candidates=4), STRATEGIES)
    return d


def one_process(data_dir: Path, out: Path, parallel: str = "fsdp", **train_kw) -> dict:
    mcfg = model_config("tiny", SumiData(data_dir).vocab, STRATEGIES, dropout=0.0, n_layers=2)
    return train(data_dir, out, mcfg, TrainConfig(batch_size=16, **{**TRAIN, **train_kw}),
                 Runtime(device="cpu", parallel=parallel), progress=False)


def two_ranks(data_dir: Path, out: Path, parallel: str, port: int, **train_kw) -> dict:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TRAIN, **train_kw}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "climber", "train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--dropout", "0",
           "--n-layers", "2", "--batch-size", "8", "--device", "cpu", "--parallel", parallel, *flags]
    res = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """One process, 20 steps of batch 16, DCP checkpoints at steps 10 and 20."""
    out = tmp_path_factory.mktemp("runs") / "one"
    one_process(data_dir, out)
    return out


def losses(run: Path) -> list[float]:
    with (run / "train_log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_weights(run / "checkpoints" / f"{checkpoint.STEP_PREFIX}{STEPS:08d}")


def assert_same_training(run: Path, reference: Path) -> None:
    assert losses(run) == pytest.approx(losses(reference), abs=2e-5)
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory) -> Path:
    """2 ranks under fsdp, as `reference`: each rank builds the item table on the meta device and
    draws its own rows."""
    out = tmp_path_factory.mktemp("runs") / "fsdp"
    assert two_ranks(data_dir, out, "fsdp", 29531)["steps"] == STEPS
    return out


def test_fsdp_with_sharded_tables_from_meta_init_on_two_ranks_equals_one_process(data_dir, reference, fsdp_run):
    """The run equals one process, which built the table whole (the same init, row for row)."""
    assert_same_training(fsdp_run, reference)
    step = fsdp_run / "checkpoints" / f"{checkpoint.STEP_PREFIX}{STEPS:08d}"
    assert checkpoint.is_sharded(step)  # each rank wrote its own shards: of the item table, its rows and their moments
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    rows = SumiData(data_dir).vocab["n_items"]
    for key in ("model.item_emb.weight", "optimizer.state.item_emb.weight.exp_avg"):
        assert sorted(c.offsets[0] for c in meta[key].chunks) == [0, -(-rows // 2)], key


def test_ddp_on_two_ranks_equals_one_process(data_dir, reference, tmp_path):
    out = tmp_path / "ddp"
    assert two_ranks(data_dir, out, "ddp", 29532)["steps"] == STEPS
    assert_same_training(out, reference)
    assert not checkpoint.is_sharded(out / "checkpoints" / f"{checkpoint.STEP_PREFIX}{STEPS:08d}")
    assert not checkpoint.is_sharded(out / "best")  # whole safetensors, written by rank 0
    assert checkpoint.load_model(out / "best")[0].cfg.n_layers == 2


def test_dcp_sharded_best_of_two_ranks_loads_whole_in_one_process(data_dir, reference, fsdp_run):
    """best/ of the fsdp run is each rank's shards (no rank gathers the model); loaded whole by
    one process it is the model at the best step (that step's checkpoint, gathered) and, within
    the training tolerance, the one-process run's best/ (safetensors); evaluate reads it."""
    from climber.evaluate import evaluate

    assert checkpoint.is_sharded(fsdp_run / "best")
    assert sorted(p.name for p in (fsdp_run / "best").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    last = fsdp_run / "checkpoints" / f"{checkpoint.STEP_PREFIX}{STEPS:08d}"
    best_step = checkpoint.load_train_state(last)["loop"]["best_step"]
    assert best_step == checkpoint.load_train_state(reference / "checkpoints" / last.name)["loop"]["best_step"]
    at_best = checkpoint.load_weights(fsdp_run / "checkpoints" / f"{checkpoint.STEP_PREFIX}{best_step:08d}")
    best = checkpoint.load_model(fsdp_run / "best")[0].state_dict()
    assert best.keys() == at_best.keys()
    for k, v in best.items():
        assert torch.equal(v, at_best[k]), k
    assert not checkpoint.is_sharded(reference / "best")
    for k, v in checkpoint.load_model(reference / "best")[0].state_dict().items():
        torch.testing.assert_close(best[k], v, rtol=1e-4, atol=1e-4, msg=k)
    got, want = (evaluate(r / "best", data_dir, "test")["model"]["mean"] for r in (fsdp_run, reference))
    assert got == pytest.approx(want, abs=1e-3, nan_ok=True)  # GAUC: nan where no user has both labels


def cut_after(run: Path, src: Path, step: int) -> None:
    """`run`: a copy of `src` as if killed after its checkpoint at `step`."""
    shutil.copytree(src, run)
    for p in (run / "checkpoints").glob(f"{checkpoint.STEP_PREFIX}*"):
        if int(p.name[len(checkpoint.STEP_PREFIX):]) > step:
            shutil.rmtree(p)


def test_dcp_checkpoint_with_sharded_tables_of_two_ranks_resumes_on_one_process(data_dir, reference, fsdp_run,
                                                                                 tmp_path):
    full = fsdp_run
    run = tmp_path / "resumed"
    cut_after(run, full, SAVE)
    saved = checkpoint.load_weights(run / "checkpoints" / f"{checkpoint.STEP_PREFIX}{SAVE:08d}")
    one_process(data_dir, run)  # world 2 x batch 8 -> world 1 x batch 16: the same global batch
    assert_same_training(run, reference)
    assert json.loads((run / "config.json").read_text())["world"] == 1
    # the shards, read back whole in one process, are the 2-rank run's weights at the save
    again = checkpoint.load_weights(full / "checkpoints" / f"{checkpoint.STEP_PREFIX}{SAVE:08d}")
    for k in saved:
        assert torch.equal(saved[k], again[k]), k


def test_dcp_checkpoint_of_one_process_resumes_on_two_ranks_with_sharded_tables(data_dir, reference, tmp_path):
    run = tmp_path / "resumed"
    cut_after(run, reference, SAVE)
    summary = two_ranks(data_dir, run, "fsdp", 29534)
    assert summary["steps"] == STEPS
    assert_same_training(run, reference)


def test_dcp_resume_on_the_same_ranks_is_exact(data_dir, reference, tmp_path):
    """One process, sharded format: killed after step 10 and resumed, it ends bit for bit where
    the uninterrupted run does (weights, AdamW state and RNG all come back)."""
    run = tmp_path / "resumed"
    cut_after(run, reference, SAVE)
    one_process(data_dir, run)
    assert losses(run) == losses(reference)
    a, b = final_weights(run), final_weights(reference)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_whole_checkpoint_resumes_sharded(data_dir, tmp_path):
    """A run saved whole (--parallel ddp) goes on under FSDP2: the weights and AdamW's state
    (keyed by parameter index) are sliced into the shards by name."""
    ddp_ref = tmp_path / "ddp"
    one_process(data_dir, ddp_ref, parallel="ddp")
    run = tmp_path / "resumed"
    cut_after(run, ddp_ref, SAVE)
    two_ranks(data_dir, run, "fsdp", 29535)
    assert checkpoint.is_sharded(run / "checkpoints" / f"{checkpoint.STEP_PREFIX}{STEPS:08d}")
    assert_same_training(run, ddp_ref)


def test_weight_average_is_sharded_with_the_weights_and_resumes(data_dir, tmp_path):
    """`ema` under FSDP2 on 2 ranks: each rank keeps the average of its own shards (written by DCP
    beside AdamW's moments), best/ equals one process's, and a resume from the sharded checkpoint
    ends with the uninterrupted run's average."""
    ref, sharded = tmp_path / "one", tmp_path / "two"
    one_process(data_dir, ref, ema=0.9)
    two_ranks(data_dir, sharded, "fsdp", 29536, ema=0.9)
    step = sharded / "checkpoints" / f"{checkpoint.STEP_PREFIX}{STEPS:08d}"
    meta = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    rows = SumiData(data_dir).vocab["n_items"]
    assert sorted(c.offsets[0] for c in meta["optimizer.state.item_emb.weight.ema"].chunks) == [0, -(-rows // 2)]
    assert_same_training(sharded, ref)
    best = checkpoint.load_model(ref / "best")[0].state_dict()
    for k, v in checkpoint.load_model(sharded / "best")[0].state_dict().items():
        torch.testing.assert_close(v, best[k], rtol=1e-4, atol=1e-4, msg=k)
    resumed = tmp_path / "resumed"
    cut_after(resumed, ref, SAVE)
    shutil.rmtree(resumed / "best")
    one_process(data_dir, resumed, ema=0.9)
    again = checkpoint.load_model(resumed / "best")[0].state_dict()
    assert checkpoint.load_train_state(resumed / "checkpoints" / step.name)["loop"]["best_step"] > SAVE
    for k, v in again.items():
        assert torch.equal(v, best[k]), k


# --- validation on every rank, and the tables' shards, in 2 spawned gloo processes ---


def _sharded_worker(rank: int, world: int, init: str, data_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        data = SumiData(Path(data_dir))
        mcfg = model_config("tiny", data.vocab, STRATEGIES, dropout=0.0, n_layers=2)
        model = build_model(mcfg, data, seed=0)
        distributed.parallelize(model, "fsdp", world)
        preds = distributed.gather(*predict(model, data, "valid", 7, torch.device("cpu"), rank=rank, world=world))
        opt = torch.optim.AdamW(model.parameters())
        model.train()
        b = next(iter(loader(data, data.requests("train")[:4], 4, mcfg)))
        model(b).float().pow(2).mean().backward()
        opt.step()
        w = model.item_emb.weight
        model.unshard()  # FSDP2 gathers what its units hold: the small tables, not the split one
        gathered = {"item": isinstance(model.item_emb.weight, DTensor), "action": isinstance(model.action_emb.weight,
                                                                                            DTensor)}
        model.reshard()
        shard = {"row_wise": w.placements == (Shard(0),), "local_rows": w.to_local().shape[0],
                 "rows": w.shape[0], "grad_rows": w.grad.to_local().shape[0],
                 "exp_avg_rows": opt.state[w]["exp_avg"].to_local().shape[0],
                 "split": isinstance(model.item_emb, distributed.RowShardedTable), "dtensor_after_unshard": gathered}
        if rank == 0:
            np.savez(Path(out) / "preds.npz", *preds)
        (Path(out) / f"shard{rank}.json").write_text(json.dumps(shard))
        dist.barrier()  # no rank tears gloo down while the other is still in a collective
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_sharded_worker, args=(2, f"file://{out / 'rdzv'}", str(data_dir), str(out)), nprocs=2)
    return out


def test_sharded_validation_equals_single_process(data_dir, sharded):
    """Each rank scores its part of the requests (batches of 7, so the ranks' batch counts
    differ and the short rank runs a spare forward); gathered, the predictions and the AUC and
    GAUC are the one-process ones."""
    data = SumiData(data_dir)
    n = len(data.requests("valid"))
    assert -(-(n // 2) // 7) != -(-(n - n // 2) // 7)  # the two halves need different batch counts
    model = build_model(model_config("tiny", data.vocab, STRATEGIES, dropout=0.0, n_layers=2), data, seed=0)
    users, labels, probs = predict(model, data, "valid", 7, torch.device("cpu"))
    got = np.load(sharded / "preds.npz")
    g_users, g_labels, g_probs = (got[f"arr_{i}"] for i in range(3))
    assert np.array_equal(g_users, users) and np.array_equal(g_labels, labels)
    np.testing.assert_allclose(g_probs, probs, rtol=1e-6, atol=1e-7)
    want, have = (evaluate_predictions(*p, data.tasks) for p in ((users, labels, probs), (g_users, g_labels, g_probs)))
    for task in want:
        assert have[task] == pytest.approx(want[task], rel=1e-6)


def test_fsdp_shards_embedding_tables_row_wise_outside_its_units(data_dir, sharded):
    """The item table (more than SMALL_TABLE rows) is a `RowShardedTable`: a DTensor split by
    rows (Shard(0)), whose gradient and AdamW's moments exist only for the local rows, and which
    FSDP2 never gathers (a small table, in FSDP2's root unit, is whole once unsharded)."""
    rows = SumiData(data_dir).vocab["n_items"]
    assert rows > SMALL_TABLE
    for rank in range(2):
        s = json.loads((sharded / f"shard{rank}.json").read_text())
        assert s["split"] and s["row_wise"] and s["rows"] == rows
        assert s["local_rows"] == s["grad_rows"] == s["exp_avg_rows"] == len(torch.arange(rows).chunk(2)[rank])
        assert s["dtensor_after_unshard"] == {"item": True, "action": False}


# --- tables built on the meta device: each rank draws its own rows, never the whole table ---


def _model(data: SumiData, meta: bool = False) -> nn.Module:
    return build_model(model_config("tiny", data.vocab, STRATEGIES, dropout=0.0, n_layers=2), data, 0, meta_tables=meta)


def _bounds(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s rows of a table split by `RowShardedTable` (as `torch.chunk` splits)."""
    block = torch.arange(rows).chunk(world)[rank]
    return int(block[0]), int(block[-1]) + 1


def test_shard_meta_init_equals_the_rows_of_the_whole_init(data_dir):
    """Built under `meta_tables`, a model's large tables have no memory and everything else is
    the whole-built model's, bit for bit (a table's values take nothing from the global RNG);
    each rank's rows, drawn alone, are those rows of the whole table, for any split, across the
    init's row blocks too."""
    data = SumiData(data_dir)
    whole, meta = _model(data), _model(data, meta=True)
    large = {n for n, m in whole.named_modules() if isinstance(m, Table) and m.num_embeddings > SMALL_TABLE}
    assert "item_emb" in large
    for name, p in meta.named_parameters():
        table = name.removesuffix(".weight") in large
        assert p.is_meta == table, name
        if not table:
            assert torch.equal(p, whole.get_parameter(name)), name
    for name, b in meta.named_buffers():
        assert torch.equal(b, whole.get_buffer(name)), name
    torch.manual_seed(1)
    big = Table(2 * INIT_BLOCK + 100, 4)  # three init blocks, the last one short
    tables = [(meta.get_submodule(n), whole.get_submodule(n).weight) for n in large] + [(big, big.weight)]
    for t, w in tables:
        for world in (2, 3):
            for rank in range(world):
                lo, hi = _bounds(t.num_embeddings, world, rank)
                assert torch.equal(t.init_rows(lo, hi), w.detach()[lo:hi]), (t, world, rank)
    assert big.weight.std().item() == pytest.approx(0.02, rel=0.05)
    with meta_tables():  # a table of at most SMALL_TABLE rows is never split, so it is built whole
        assert not Table(SMALL_TABLE, 4).weight.is_meta and Table(SMALL_TABLE + 1, 4).weight.is_meta


class _LargestTensor(TorchDispatchMode):
    """The most elements of any floating tensor an op makes while it is on (for a DTensor, its
    local part: what the rank holds)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta:
                self.most = max(self.most, (t.to_local() if isinstance(t, DTensor) else t).numel())
        return out


BIG = tiny_config(n_items=3 * INIT_BLOCK + 100, item_feature_cards=(INIT_BLOCK + 50,))  # tables of several init blocks


def _big(meta: bool = False) -> nn.Module:
    torch.manual_seed(0)
    with meta_tables() if meta else contextlib.nullcontext():
        return make_model(BIG)


def _meta_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        spy = _LargestTensor()
        with spy:  # what train.setup does under fsdp, then one training step
            model = _big(meta=True)
            meta = model.item_emb.weight.is_meta
            distributed.shard_tables(model, world, torch.device("cpu"))
            distributed.parallelize(model, "fsdp", world)
            rows = model.item_emb.weight.to_local().detach().clone()
            opt = torch.optim.AdamW(model.parameters())
            model(random_batch(BIG, seed=rank)).float().pow(2).mean().backward()
            opt.step()
        w = model.item_emb.weight
        torch.save({"meta_before_split": meta, "rows": rows, "most": spy.most, "local": tuple(w.to_local().shape),
                    "grad": tuple(w.grad.to_local().shape), "exp_avg": tuple(opt.state[w]["exp_avg"].to_local().shape)},
                   Path(out) / f"meta{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_shard_from_meta_never_makes_the_whole_table_on_a_rank(tmp_path):
    """2 ranks build a model as training does under fsdp (`meta_tables`, then `shard_tables`)
    and take a step: the item table (3 init blocks and a bit) is on the meta device until split;
    each rank's rows are those of the one-process init; its weight, gradient and AdamW moment
    hold its rows only; and no floating tensor any op makes on a rank, from the build to the
    optimizer step, is larger than the rank's block of the item table (half the table)."""
    whole = _big().item_emb.weight.detach()
    rows, d = whole.shape
    mp.spawn(_meta_worker, args=(2, f"file://{tmp_path / 'rdzv'}", str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"meta{rank}.pt")
        lo, hi = _bounds(rows, 2, rank)
        assert got["most"] <= (hi - lo) * d < rows * d, got["most"]
        assert got["meta_before_split"]
        assert torch.equal(got["rows"], whole[lo:hi])
        assert got["local"] == got["grad"] == got["exp_avg"] == (hi - lo, d)


# --- the sharded lookup against F.embedding on the whole table, in 2 spawned gloo processes ---

ROWS, D = 301, 8
SIZES = ((3, 5), (2, 2))  # each rank's ids: different counts


def _ids(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, ROWS, SIZES[rank], generator=g)
    ids[0, 0] = 0  # padding: its row is read, and gets no gradient
    n = 4 - 3 * rank
    codes = torch.randint(0, ROWS - 1, (n, 3), generator=g) * (torch.rand(n, 3, generator=g) < 0.7)
    codes[-1] = 0  # an empty bag
    return {"ids": ids, "codes": codes, "c": torch.randn(*SIZES[rank], D, generator=g),
            "e": torch.randn(len(codes), D, generator=g)}


def _loss(emb: torch.Tensor, bag: torch.Tensor, x: dict) -> torch.Tensor:
    return (emb * x["c"]).sum() + (bag * x["e"]).sum()


def _lookup_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        tables = nn.ModuleDict({"item": Table(ROWS, D, padding_idx=0), "feat": Table(ROWS - 1, D)})
        whole = {k: t.weight.detach().clone() for k, t in tables.items()}
        distributed.shard_tables(tables, world, torch.device("cpu"))
        x = _ids(rank)
        emb, bag = tables["item"](x["ids"]), tables["feat"].bag_mean(x["codes"])
        _loss(emb, bag, x).backward()
        empty = tables["item"](x["ids"][:0] if rank == 1 else x["ids"])  # one rank with no ids at all
        res = {"emb": emb.detach(), "bag": bag.detach(), "empty_shape": tuple(empty.shape),
               "local_rows": {k: t.weight.to_local().shape[0] for k, t in tables.items()},
               "grad": {k: t.weight.grad.full_tensor() for k, t in tables.items()}}
        try:
            tables["item"](x["ids"] + (ROWS if rank == 1 else 0))  # rank 1 alone has ids past the table
        except IndexError as e:
            res["error"] = str(e)
        torch.save(res, Path(out) / f"lookup{rank}.pt")
        if rank == 0:
            torch.save(whole, Path(out) / "whole.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def lookup(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lookup")
    mp.spawn(_lookup_worker, args=(2, f"file://{out / 'rdzv'}", str(out)), nprocs=2)
    return out


def test_shard_lookup_equals_embedding_on_the_whole_table(lookup):
    """Each rank's rows and bag means are `F.embedding` / `F.embedding_bag` on the whole table;
    each table's gradient, gathered from the shards, is the mean over ranks of each rank's loss's
    gradient on the whole table (as DDP averages), padding row 0 included (zero)."""
    whole = torch.load(lookup / "whole.pt")
    ref = {k: w.clone().requires_grad_() for k, w in whole.items()}
    losses = []
    for rank in range(2):
        x, got = _ids(rank), torch.load(lookup / f"lookup{rank}.pt")
        emb = F.embedding(x["ids"], ref["item"], padding_idx=0)
        bag = F.embedding_bag(x["codes"], ref["feat"], mode="mean", padding_idx=0)
        torch.testing.assert_close(got["emb"], emb.detach(), rtol=0, atol=0)
        torch.testing.assert_close(got["bag"], bag.detach(), rtol=1e-6, atol=1e-7)
        assert got["local_rows"] == {"item": len(torch.arange(ROWS).chunk(2)[rank]),
                                     "feat": len(torch.arange(ROWS - 1).chunk(2)[rank])}
        losses.append(_loss(emb, bag, x))
    torch.stack(losses).mean().backward()
    for rank in range(2):
        got = torch.load(lookup / f"lookup{rank}.pt")
        for k in ref:
            torch.testing.assert_close(got["grad"][k], ref[k].grad, rtol=1e-6, atol=1e-7, msg=k)
    assert ref["item"].grad[0].abs().sum() == 0 and ref["item"].grad.abs().sum(-1).gt(0).sum() > 5
    assert torch.load(lookup / "lookup0.pt")["empty_shape"] == (*SIZES[0], D)
    assert torch.load(lookup / "lookup1.pt")["empty_shape"] == (0, SIZES[1][1], D)


def test_shard_lookup_of_an_id_outside_the_table_fails_on_every_rank(lookup):
    """Rank 1's ids run past the table: both ranks raise (neither waits forever in a collective),
    naming the table, the rank and the table's size."""
    for rank in range(2):
        msg = torch.load(lookup / f"lookup{rank}.pt").get("error", "")
        assert msg.startswith("item: id out of range (rank 1's batch") and f"table has {ROWS} rows" in msg, msg


# --- data prepared with --shards: each rank trains and validates on its own shards' users ---

SHARDS, SHARD_SAVE = 4, 15
# two whole epochs (22 steps each), one validation at the end, a checkpoint mid-epoch
SHARD_TRAIN = TrainConfig(batch_size=16, epochs=2, lr=3e-3, warmup_steps=5, log_every=1, eval_every=1000,
                          checkpoint_every=SHARD_SAVE, keep_checkpoints=10, patience=100, bucket_window=2)


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory) -> Path:
    """`data_dir`'s log with a shard index of 4 user ranges: 2 a rank on 2 ranks."""
    d = tmp_path_factory.mktemp("data") / "sharded"
    prepare(synthetic_log(n_users=29, n_items=300), d, PrepareConfig(request_gap=50, max_candidates=4), STRATEGIES,
            shards=SHARDS)
    return d


def _shard_train_worker(rank: int, world: int, init: str, data_dir: str, out: str, spy: str) -> None:
    """`train` on rank `rank` (DDP, gloo), recording the requests of every batch the rank builds and
    the users of the views (`SumiData.users`) that build them."""
    os.environ["WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    seen, views, batch = [], set(), SumiData.batch

    def recorded(self, req, *a, **k):
        seen.append(req.tolist())
        views.add(self.users)
        return batch(self, req, *a, **k)

    SumiData.batch = recorded
    mcfg = model_config("tiny", SumiData(data_dir).vocab, STRATEGIES, dropout=0.0, n_layers=2)
    summary = train(Path(data_dir), Path(out), mcfg, SHARD_TRAIN, Runtime(device="cpu", parallel="ddp"),
                    progress=False)
    (Path(spy) / f"rank{rank}.json").write_text(json.dumps({"batches": seen, "views": sorted(views),
                                                            "summary": summary}))


def shard_train(data_dir: Path, out: Path, spy: Path) -> list[dict]:
    """Train on 2 spawned ranks; each rank's batches (request ids, in order), views' users and summary."""
    spy.mkdir()
    mp.spawn(_shard_train_worker, args=(2, f"file://{spy / 'rdzv'}", str(data_dir), str(out), str(spy)), nprocs=2)
    return [json.loads((spy / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def shard_run(shard_data, tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("shard_run")
    return root / "run", shard_train(shard_data, root / "run", root / "spy")


def split_batches(data: SumiData, spied: dict, split: int) -> list[np.ndarray]:
    """The batches of a rank whose requests are of `split` (training's or validation's), in order."""
    return [np.array(b) for b in spied["batches"] if data.a["req_split"][b[0]] == split]


def own_users(data: SumiData, rank: int, world: int) -> np.ndarray:
    """(n_users,) bool: the users of rank `rank`'s block of shards, rank N/world .. (rank + 1) N/world - 1."""
    users, own, per = data.meta["shards"]["users"], np.zeros(data.vocab["n_users"], bool), SHARDS // world
    own[users[rank * per]:users[(rank + 1) * per]] = True
    return own


def test_shard_training_ranks_take_only_their_shards_users(shard_data, shard_run):
    data = SumiData(shard_data)
    _, spied = shard_run
    for rank in range(2):
        batches = split_batches(data, spied[rank], TRAIN_SPLIT)
        assert len(batches) == spied[rank]["summary"]["steps"]
        assert own_users(data, rank, 2)[data.a["req_user"][np.concatenate(batches)]].all(), rank
        assert spied[rank]["views"] == [list(data.for_rank(rank, 2).users)]  # built by the rank's view alone
    # the check can fail: the strided part of one global order (data without shards) mixes the ranks' users
    strided = np.random.default_rng([0, 0]).permutation(data.requests("train"))[0::2]
    assert not own_users(data, 0, 2)[data.a["req_user"][strided]].all()


def test_shard_training_sees_each_request_once_an_epoch_but_the_drop(shard_data, shard_run):
    """Every epoch each rank takes as many of its requests as the rank with the fewest has, each
    once; the rank with more leaves out the difference (a random few, drawn afresh every epoch)."""
    data = SumiData(shard_data)
    _, spied = shard_run
    train_req = data.requests("train")
    parts = data.rank_parts(train_req, 2)
    assert np.array_equal(np.sort(np.concatenate(parts)), train_req)  # the ranks' parts split the requests
    per_rank = min(map(len, parts))
    steps = -(-per_rank // SHARD_TRAIN.batch_size)
    assert per_rank < max(map(len, parts))  # a rank has requests to leave out
    dropped = []
    for rank in range(2):
        batches = split_batches(data, spied[rank], TRAIN_SPLIT)
        assert len(batches) == SHARD_TRAIN.epochs * steps
        for e in range(SHARD_TRAIN.epochs):
            got = np.concatenate(batches[e * steps:(e + 1) * steps])
            assert len(np.unique(got)) == len(got) == per_rank and np.isin(got, parts[rank]).all()
            dropped.append(frozenset(parts[rank]) - frozenset(got))
    assert len(dropped[0]) == len(dropped[1]) == len(parts[0]) - per_rank and dropped[0] != dropped[1]


def test_shard_validation_on_two_ranks_equals_one_process(shard_data, shard_run):
    """Each rank scores its own shards' validation requests; rank 0's metrics over the gathered
    predictions (in rank order, not the split's) are one process's on the same weights."""
    from climber.evaluate import evaluate

    data = SumiData(shard_data)
    run, spied = shard_run
    valid = data.requests("valid")
    for rank in range(2):
        got = np.concatenate(split_batches(data, spied[rank], VALID))
        assert np.array_equal(np.sort(got), data.rank_parts(valid, 2)[rank])
    summary = spied[0]["summary"]
    assert summary["best_step"] == summary["steps"]  # one validation, at the end: best/ holds the final weights
    want = evaluate(run / "best", shard_data, "valid")["model"]
    for task, res in want.items():
        assert summary["best_valid"][task] == pytest.approx(res, rel=1e-6, nan_ok=True), task


def test_shard_training_resumed_equals_uninterrupted(shard_data, shard_run, tmp_path):
    """Killed mid-epoch after its checkpoint and resumed on 2 ranks, a run takes the same batches
    from there and ends with the same weights, bit for bit."""
    full, spied = shard_run
    run = tmp_path / "resumed"
    cut_after(run, full, SHARD_SAVE)
    again = shard_train(shard_data, run, tmp_path / "spy")
    data = SumiData(shard_data)
    for rank in range(2):
        done = split_batches(data, spied[rank], TRAIN_SPLIT)[SHARD_SAVE:]
        assert [b.tolist() for b in split_batches(data, again[rank], TRAIN_SPLIT)] == [b.tolist() for b in done]
    assert losses(run) == losses(full)
    last = f"{checkpoint.STEP_PREFIX}{spied[0]['summary']['steps']:08d}"
    a, b = (checkpoint.load_weights(r / "checkpoints" / last) for r in (run, full))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_shards_that_the_ranks_cannot_split_evenly_are_a_clear_error(shard_data):
    data = SumiData(shard_data)
    for world in (3, 8):
        with pytest.raises(DataError, match=f"4 shards cannot be split evenly over {world} ranks; prepare with "
                                            f"--shards a multiple of {world}"):
            data.rank_parts(data.requests("train"), world)
    assert data.rank_parts(data.requests("train"), 1) is None  # one process reads everything, as without shards


# --- a rank's view of its block of shards (SumiData.for_rank): its users' events alone ---

KINDS = ("recent", "pos:like", "neg:click", "scenario:1@4", "action:2", "recent@4")  # every kind of strategy


@pytest.fixture(scope="module", params=["explicit", "implicit"])
def kinds_data(request, tmp_path_factory) -> Path:
    """`shard_data`'s log, or its rows as an implicit log, with strategies of every kind."""
    log = synthetic_log(n_users=29, n_items=300)
    if request.param == "implicit":
        log = dataclasses.replace(log, labels=np.ones_like(log.labels), implicit=True)
    d = tmp_path_factory.mktemp("data") / request.param
    prepare(log, d, PrepareConfig(request_gap=50, max_candidates=4, negatives=3), KINDS, shards=SHARDS)
    return d


def batches_of(data: SumiData, req: np.ndarray) -> list[dict]:
    """`data`'s batches of 8 of `req` with seq_len 6 (so the caps bite); on implicit data, with 2
    fresh negatives a positive from a generator seeded by the batch's first request."""
    out = []
    for i in range(0, len(req), 8):
        r = req[i : i + 8]
        out.append(data.batch(r, KINDS, 6, (2, np.random.default_rng(int(r[0]))) if data.implicit else None))
    return out


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_shard_view_builds_the_whole_datas_batches_of_its_requests(kinds_data):
    whole = SumiData(kinds_data)
    req = np.arange(len(whole.a["req_user"]))  # every split's
    index = whole.meta["shards"]
    for world in (2, 4):
        per = SHARDS // world
        for rank, part in enumerate(whole.rank_parts(req, world)):
            view = whole.for_rank(rank, world)
            assert view.users == (index["users"][rank * per], index["users"][(rank + 1) * per])
            assert view.events == (index["events"][rank * per], index["events"][(rank + 1) * per])
            assert_same_batches(batches_of(view, part), batches_of(whole, part))
    assert whole.for_rank(0, 1) is whole  # one process: the whole data, as without shards


class Guarded:
    """An event array that fails on any read of a row outside [lo, hi): by an index or a slice, or
    of the whole array (any other use: `.astype`, numpy's array protocols)."""

    def __init__(self, arr: np.ndarray, lo: int, hi: int):
        self.arr, self.lo, self.hi = arr, lo, hi

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, key):
        rows = np.atleast_1d(np.arange(len(self.arr))[key[0] if isinstance(key, tuple) else key])
        if len(rows) and (rows.min() < self.lo or rows.max() >= self.hi):
            raise AssertionError(f"read rows {rows.min()}..{rows.max()}, outside {self.lo}..{self.hi - 1}")
        return self.arr[key]

    def __getattr__(self, name: str):
        raise AssertionError(f"read the whole array (.{name})")


def test_shard_view_reads_no_event_outside_its_users(kinds_data):
    """With every ev_* array guarded to the rank's events, its view builds the whole data's
    batches; the whole data, guarded alike, fails (its strategies' matches read every event)."""
    whole = SumiData(kinds_data)
    req, events = np.arange(len(whole.a["req_user"])), whole.meta["shards"]["events"]
    for rank, part in enumerate(whole.rank_parts(req, 2)):
        view, plain = whole.for_rank(rank, 2), SumiData(kinds_data)
        for data in (view, plain):
            for k in [k for k in data.a if k.startswith("ev_")]:
                data.a[k] = Guarded(data.a[k], events[2 * rank], events[2 * rank + 2])  # 2 of the 4 shards a rank
        assert_same_batches(batches_of(view, part), batches_of(whole, part))
        with pytest.raises(AssertionError, match="read rows 0..|read the whole array"):
            batches_of(plain, part)


def test_shard_view_refuses_requests_of_other_users(kinds_data):
    whole = SumiData(kinds_data)
    mine, theirs = whole.rank_parts(whole.requests("train"), 2)[::-1]
    view = whole.for_rank(1, 2)
    u0, u1 = view.users
    r, u = int(theirs[-1]), int(whole.a["req_user"][theirs[-1]])
    assert u < u0
    with pytest.raises(DataError, match=rf"request {r} is of user {u}, outside this view's users {u0}\.\.{u1 - 1}"):
        view.batch(np.r_[mine[:3], r], KINDS, 6)
    with pytest.raises(DataError, match=rf"user {u}, outside this view's users"):
        view.sample_negatives(np.array([u0, u]), np.random.default_rng(0))
