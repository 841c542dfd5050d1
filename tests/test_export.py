"""`climber export`: torch.export programs and ONNX graphs equal the eager model on inputs of other
sizes than the ones traced (batch, history and candidates are dynamic), for Climber's prefill /
score with the KV cache as plain tensors, and for every model's forward."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from climber import export
from climber.checkpoint import load_model
from climber.cli import main
from climber.model import make_model
from tests.helpers import perturb, random_batch, tiny_config
from tests.serve_helpers import make_checkpoint

# the defaults (match readout on), and every optional readout on with a bag feature (as ML-100K's genres)
POOLED = {"pooled_readout": True, "target_product": True, "item_feature_cards": (5,), "item_feature_widths": (3,)}


def climber(**kw):
    torch.manual_seed(0)
    model = make_model(tiny_config(**kw)).eval()
    perturb(model)
    return model


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """`climber export --format torch` of a tiny checkpoint with the default config: (model, out dir)."""
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root)
    main(["export", "--checkpoint", str(ckpt), "--out", str(root / "graphs"), "--format", "torch"])
    return load_model(ckpt)[0], root / "graphs"


@pytest.fixture(scope="module")
def pooled_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export_pooled")
    model = climber(**POOLED)
    export.export_model(model, out, "torch")
    return model, out


def inputs(model, name: str, ins: tuple[str, ...], seed: int = 3) -> tuple[torch.Tensor, ...]:
    """Inputs of graph `name` at sizes unlike the traced example's (B 3, L 7, M 4)."""
    b = random_batch(model.cfg, B=3, L=7, M=4, seed=seed)
    if name == "score":
        with torch.no_grad():
            b = b | export.cache_tensors(model.prefill(b))
    return tuple(b[n] for n in ins)


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("which", ["cli_export", "pooled_export"])
def test_export_torch_program_equals_eager(which, request):
    model, out = request.getfixturevalue(which)
    for name, (module, ins, _, _) in export.graphs(model).items():
        args = inputs(model, name, ins)
        with torch.no_grad():
            want = as_tuple(module(*args))
        got = as_tuple(torch.export.load(out / f"{name}.pt2").module()(*args))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    # the score graph on the prefill graph's cache is the model's forward on the same requests
    b = random_batch(model.cfg, B=3, L=7, M=4, seed=4)
    keys, values, hist_sum = torch.export.load(out / "prefill.pt2").module()(*(b[n] for n in export.PREFILL_IN))
    cache = {"keys": keys, "values": values, "hist_sum": hist_sum} | b
    logits = torch.export.load(out / "score.pt2").module()(*(cache[n] for n in export.SCORE_IN))
    with torch.no_grad():
        torch.testing.assert_close(logits[b["cand_mask"]], model(b)[b["cand_mask"]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["dlrm", "din", "twin", "transformer", "hstu"])
def test_export_baseline_forward(arch, tmp_path):
    torch.manual_seed(0)
    model = make_model(tiny_config(arch=arch)).eval()
    man = export.export_model(model, tmp_path, "torch")
    assert list(man["graphs"]) == ["forward"]
    b = random_batch(model.cfg, B=3, L=7, M=4, seed=3)
    args = tuple(b[n] for n in export.FORWARD_IN)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(tmp_path / "forward.pt2").module()(*args), model(b),
                                   atol=1e-6, rtol=1e-6)


def test_export_cli_manifest_names_dynamic_dims(cli_export):
    model, out = cli_export
    assert sorted(p.name for p in out.iterdir()) == ["forward.pt2", "manifest.json", "prefill.pt2", "score.pt2"]
    man = json.loads((out / "manifest.json").read_text())
    cfg = model.cfg
    assert man["model"]["match_readout"] is True and man["model"]["d_model"] == cfg.d_model
    assert man["data"] == str((out.parent / "data").resolve())
    prefill, score = man["graphs"]["prefill"], man["graphs"]["score"]
    assert [i["name"] for i in prefill["inputs"]] == list(export.PREFILL_IN)
    assert [o["name"] for o in prefill["outputs"]] == list(export.PREFILL_OUT)
    assert prefill["outputs"][0]["shape"] == [cfg.n_layers, "batch", cfg.n_blocks, cfg.n_heads, "history",
                                              cfg.d_head]
    assert prefill["inputs"][0] == {"name": "hist_item", "dtype": "int64", "shape": ["batch", cfg.n_blocks, "history"]}
    assert [i["name"] for i in score["inputs"]] == list(export.SCORE_IN)
    assert score["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "candidates", 2]}]
    assert man["graphs"]["forward"]["inputs"][-1] == {"name": "cand_mask", "dtype": "bool",
                                                       "shape": ["batch", "candidates"]}


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="onnxruntime and onnxscript not installed (pip install 'climber-rec[export]')")
def test_onnx_runtime_equals_pytorch(tmp_path):
    """ONNX prefill and score (the serving pair) in onnxruntime equal PyTorch within 1e-5 (absolute,
    plus 1e-5 relative: perturbed logits reach about 5), with every readout on and a bag feature."""
    import onnxruntime

    model = climber(**POOLED)
    for name, (module, ins, outs, example) in export.graphs(model).items():
        if name == "forward":  # the same code as prefill + score (tests/test_model.py); saves 20 s
            continue
        entry = export.export_graph(name, module, ins, outs, example, tmp_path, "onnx")
        assert entry["files"] == [f"{name}.onnx"]
        session = onnxruntime.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == list(ins)
        args = inputs(model, name, ins)
        got = session.run(list(outs), {n: a.numpy() for n, a in zip(ins, args, strict=True)})
        with torch.no_grad():
            want = as_tuple(module(*args))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=1e-5)
