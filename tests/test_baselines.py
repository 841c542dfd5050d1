"""Table 2 baselines on CPU with tiny configs: the SUMI contract, FLOPs, gradients, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from climber import checkpoint
from climber.baselines import BASELINES
from climber.config import TrainConfig, model_config
from climber.data.sumi import PrepareConfig, SumiData, prepare
from climber.model import make_model
from climber.train import predict, train
from tests.helpers import random_batch, synthetic_log, tiny_config

ARCHS = sorted(BASELINES)


def make(arch: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = make_model(tiny_config(arch=arch, **kw)).eval()
    with torch.no_grad():  # O(1) activations and bias tables, so the properties below are not vacuous
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def select(b: dict, cols) -> dict:
    """The same requests with only candidate columns `cols`."""
    return {**b, **{k: b[k][:, cols] for k in ("cand_item", "cand_mask", "labels")}}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side_features", (True, False))
def test_output_shape_and_empty_history(arch, side_features):
    kw = {} if side_features else {"item_feature_cards": (), "user_feature_cards": ()}
    model = make(arch, **kw)
    b = random_batch(model.cfg, B=3, M=5)
    out = model(b)
    assert out.shape == (3, 5, 2) and torch.isfinite(out).all()
    empty = {**b, "hist_mask": torch.zeros_like(b["hist_mask"]), "hist_item": torch.zeros_like(b["hist_item"])}
    assert torch.isfinite(model(empty)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_permuting_candidates_permutes_scores(arch):
    model = make(arch)
    b = random_batch(model.cfg, B=4, M=6)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(select(b, perm)), model(b)[:, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_candidates_scored_together_equal_scored_alone(arch):
    model = make(arch)
    b = random_batch(model.cfg, B=4, M=6, full=True)
    together = model(b)
    assert (together[:, 0] - together[:, 1]).abs().max() > 1e-3  # candidates do get different scores
    for j in range(6):
        torch.testing.assert_close(model(select(b, [j]))[:, 0], together[:, j], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_history_padding_does_not_change_scores(arch):
    """A batch is trimmed to its longest history; extra left padding must not move any score."""
    model = make(arch)
    b = random_batch(model.cfg, B=3, L=5, M=4)
    pad = {k: torch.nn.functional.pad(b[k], (3, 0)) for k in ("hist_item", "hist_time", "hist_action",
                                                                "hist_scenario", "hist_mask")}
    pad["hist_labels"] = torch.nn.functional.pad(b["hist_labels"], (0, 0, 3, 0))
    torch.testing.assert_close(model({**b, **pad}), model(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_flops_formula_matches_torch_flop_counter(arch):
    model = make(arch)
    L, M = 8, 5
    b = random_batch(model.cfg, B=1, L=L, M=M, full=True)
    with FlopCounterMode(display=False) as fc:
        model(b)
    fl = model.flops(L, M)
    assert fc.get_total_flops() == fl["exact"] > 0
    assert fl["per_candidate"] == fl["exact"] / M and 0 <= fl["paper"] <= fl["exact"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_gets_a_gradient(arch):
    """Gradients reach the item embeddings (candidates and history) and every other weight."""
    model = make(arch).train()
    b = random_batch(model.cfg, B=4, M=5, full=True)
    model(b)[b["cand_mask"]].square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    g = model.item_emb.weight.grad.abs().sum(-1)
    assert (g[b["cand_item"][b["cand_mask"]]] > 0).all()
    hist = b["hist_item"][:, 0][b["hist_mask"][:, 0]]  # block 0: every baseline reads it
    # TWIN's top-k retrieval passes gradient to the retrieved events only
    assert (g[hist] > 0).any() if arch == "twin" else (g[hist] > 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_param_counts_add_up(arch):
    model = make(arch)
    pc = model.param_counts()
    assert pc["embedding"] + pc["dense"] == pc["total"] == sum(p.numel() for p in model.parameters())
    assert pc["embedding"] >= model.item_emb.weight.numel() and pc["dense"] > 0


def test_single_history_baselines_need_recent_first():
    with pytest.raises(ValueError, match="'recent' first"):
        make("transformer", strategies=("pos:like", "recent"))


def test_twin_gsu_retrieves_only_real_events():
    """With exactly k real events, top-k retrieval equals attending to the whole history:
    padding is never retrieved in place of an event."""
    model = make("twin")
    assert model.top_k == 2 < model.cfg.seq_len  # tiny: seq_len 8, so the GSU really filters
    b = random_batch(model.cfg, B=4, M=6, full=True, seed=5)
    b["hist_mask"][:, :, :-2] = False  # two real events per block
    retrieved = model(b)
    model.top_k = model.cfg.seq_len
    torch.testing.assert_close(retrieved, model(b), atol=1e-5, rtol=1e-5)
    model.top_k = 1  # and retrieving fewer than the history does change the scores
    assert (model(b) - retrieved).abs().max() > 1e-3


STRATEGIES = ("recent", "pos:like", "recent@4")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "synthetic"
    prepare(synthetic_log(), d, PrepareConfig(request_gap=50, max_candidates=4), STRATEGIES)
    return d


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_through_climber_train_and_reloads(arch, data_dir, tmp_path):
    data = SumiData(data_dir)
    mcfg = model_config("tiny", data.vocab, STRATEGIES, arch=arch)
    summary = train(data_dir, tmp_path / "run", mcfg, TrainConfig(epochs=1, max_steps=3, batch_size=16, warmup_steps=1),
                    progress=False)
    assert summary["steps"] == 3 and summary["best_step"] == 3
    model, config = checkpoint.load_model(tmp_path / "run" / "best")
    assert type(model) is BASELINES[arch] and config["model"]["arch"] == arch
    assert model.item_features.abs().sum() > 0  # the data's side-feature table travelled with the weights
    _, labels, probs = predict(model, data, "valid", 32, torch.device("cpu"))
    assert probs.shape == labels.shape and np.isfinite(probs).all()
