"""Export: a checkpoint's graphs as torch.export programs (`.pt2`) and ONNX, for serving outside
Python or this package (docs/paper.md section 3.2 for the prefill / score split).

Graphs, each with plain named tensors in and out (no dicts, no `HistoryCache` object):

* `prefill` (Climber): history -> the KV cache, every layer's keys and values stacked,
      inputs  hist_item, hist_time, hist_action, hist_scenario, hist_labels (B, K, L[, T]),
              hist_mask (B, K, L) bool, req_scenario (B,), user (B,)
      outputs keys, values (N_L, B, K, H, L, dh), hist_sum (B, K, d)
* `score` (Climber): the cache and candidates -> logits,
      inputs  keys, values, hist_sum (prefill's outputs), hist_mask, hist_time, req_scenario,
              user (prefill's inputs), cand_item (B, M), req_time (B,)
      outputs logits (B, M, T)
* `forward` (every model, Climber and the baselines): a SUMI batch -> logits (B, M, T),
      inputs  user, req_time, req_scenario, hist_*, cand_item, cand_mask.

B (batch), L (history) and M (candidates) are dynamic; everything else is fixed by the config.
Ids are dense (`climber/data/sumi.py`: items 0 pad, 1 unknown; users 0 unknown); probabilities
are sigmoid(logits). `manifest.json` records each graph's input and output names, dtypes and
shapes (dynamic dims by name) and the model config. Graphs are traced on CPU in fp32 with the
reference attention, the model's specification.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from climber.config import to_dict
from climber.extras import require
from climber.model import Climber, HistoryCache

HISTORY = ("hist_item", "hist_time", "hist_action", "hist_scenario", "hist_labels", "hist_mask")
PREFILL_IN = (*HISTORY, "req_scenario", "user")
PREFILL_OUT = ("keys", "values", "hist_sum")
SCORE_IN = ("keys", "values", "hist_sum", "hist_mask", "hist_time", "req_scenario", "user", "cand_item", "req_time")
FORWARD_IN = ("user", "req_time", "req_scenario", *HISTORY, "cand_item", "cand_mask")
LOGITS = ("logits",)
FORMATS = ("torch", "onnx", "both")


def cache_tensors(cache: HistoryCache) -> dict[str, torch.Tensor]:
    """A `HistoryCache` as the named tensors of the `score` graph's cache inputs."""
    return {"keys": cache.kv[:, 0], "values": cache.kv[:, 1],
            "hist_sum": cache.hist_sum, "hist_mask": cache.hist_mask, "hist_time": cache.hist_time,
            "req_scenario": cache.scenario, "user": cache.user}


class Prefill(nn.Module):
    def __init__(self, model: Climber):
        super().__init__()
        self.model = model

    def forward(self, hist_item, hist_time, hist_action, hist_scenario, hist_labels, hist_mask, req_scenario, user):
        c = self.model.prefill(dict(zip(PREFILL_IN, (hist_item, hist_time, hist_action, hist_scenario, hist_labels,
                                                     hist_mask, req_scenario, user), strict=True)))
        t = cache_tensors(c)
        return t["keys"], t["values"], t["hist_sum"]


class Score(nn.Module):
    def __init__(self, model: Climber):
        super().__init__()
        self.model = model

    def forward(self, keys, values, hist_sum, hist_mask, hist_time, req_scenario, user, cand_item, req_time):
        cache = HistoryCache(torch.stack([keys, values], 1), hist_mask, hist_time, req_scenario, user, hist_sum)
        return self.model.score(cache, cand_item, req_time)


class Forward(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, user, req_time, req_scenario, hist_item, hist_time, hist_action, hist_scenario, hist_labels,
                hist_mask, cand_item, cand_mask):
        return self.model(dict(zip(FORWARD_IN, (user, req_time, req_scenario, hist_item, hist_time, hist_action,
                                                hist_scenario, hist_labels, hist_mask, cand_item, cand_mask),
                                   strict=True)))


def example_batch(cfg, B: int = 2, L: int = 5, M: int = 3) -> dict[str, torch.Tensor]:
    """Inputs to trace with: sizes unlike each other and unlike every fixed dim's, and above 1
    (torch.export specialises a dim whose example is 0 or 1)."""
    K, T = cfg.n_blocks, len(cfg.tasks)
    hist = torch.ones(B, K, L, dtype=torch.long)
    return {"user": torch.ones(B, dtype=torch.long), "req_time": torch.full((B,), 100),
            "req_scenario": torch.zeros(B, dtype=torch.long), "hist_item": hist * 2,
            "hist_time": torch.arange(L).expand(B, K, L).contiguous(), "hist_action": hist * 0,
            "hist_scenario": hist * 0, "hist_labels": torch.zeros(B, K, L, T, dtype=torch.long),
            "hist_mask": hist.bool(), "cand_item": torch.full((B, M), 2), "cand_mask": torch.ones(B, M, dtype=bool)}


def _dims(names: tuple[str, ...]) -> dict[str, dict[int, torch.export.Dim]]:
    """Dynamic dims of each input: batch first everywhere, history / candidates where they occur."""
    B, L, M = (torch.export.Dim(n, min=1) for n in ("batch", "history", "candidates"))
    axes = {"keys": {1: B, 4: L}, "values": {1: B, 4: L}, "hist_sum": {0: B}, "cand_item": {0: B, 1: M},
            "cand_mask": {0: B, 1: M}} | {h: {0: B, 2: L} for h in HISTORY}
    return {n: axes.get(n, {0: B}) for n in names}


def graphs(model: nn.Module) -> dict[str, tuple[nn.Module, tuple[str, ...], tuple[str, ...], tuple]]:
    """name -> (wrapper, input names, output names, example inputs) of every graph `model` has."""
    with torch.no_grad():
        b = example_batch(model.cfg)
        out = {"forward": (Forward(model), FORWARD_IN, LOGITS, tuple(b[n] for n in FORWARD_IN))}
        if isinstance(model, Climber):
            cache = cache_tensors(model.prefill(b)) | b
            out["prefill"] = (Prefill(model), PREFILL_IN, PREFILL_OUT, tuple(b[n] for n in PREFILL_IN))
            out["score"] = (Score(model), SCORE_IN, LOGITS, tuple(cache[n] for n in SCORE_IN))
    return out


def _signature(ep: torch.export.ExportedProgram, ins: tuple[str, ...], outs: tuple[str, ...]) -> dict:
    """Names, dtypes and shapes (dynamic dims by name) of a program's user inputs and outputs."""
    nodes = {n.name: n for n in ep.graph.nodes}
    dims = _dims(ins)
    sym = {}
    for name in ins:
        shape = nodes[name].meta["val"].shape
        for axis, dim in dims[name].items():
            sym[str(shape[axis])] = dim.__name__

    def describe(name: str, node) -> dict:
        v = node.meta["val"]
        return {"name": name, "dtype": str(v.dtype).removeprefix("torch."),
                "shape": [int(s) if isinstance(s, int) else sym.get(str(s), str(s)) for s in v.shape]}

    out_nodes = ep.graph.output_node().args[0]
    return {"inputs": [describe(n, nodes[n]) for n in ins],
            "outputs": [describe(n, node) for n, node in zip(outs, out_nodes, strict=True)]}


def export_model(model: nn.Module, out_dir: Path, fmt: str = "both", notes: dict | None = None) -> dict:
    """Write each graph of `model` (CPU, fp32, eval) to out_dir as <graph>.pt2 and/or <graph>.onnx,
    and manifest.json (with `notes` added); returns the manifest."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if fmt != "torch":
        for module in ("onnx", "onnxscript"):
            require(module, "export", "ONNX export (or pass --format torch)")
    model = model.cpu().float().eval().requires_grad_(False)
    manifest = {"model": to_dict(model.cfg), "dynamic_dims": ["batch", "history", "candidates"],
                "probabilities": "sigmoid(logits)", "torch": torch.__version__, **(notes or {}), "graphs": {}}
    for name, graph in graphs(model).items():
        manifest["graphs"][name] = export_graph(name, *graph, out_dir, fmt)
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_graph(name: str, module: nn.Module, ins: tuple[str, ...], outs: tuple[str, ...], example: tuple,
                 out_dir: Path, fmt: str) -> dict:
    """One graph (an entry of `graphs`) to out_dir/<name>.pt2 and/or .onnx; returns its manifest entry."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        ep = torch.export.export(module, example, dynamic_shapes=_dims(ins))
    entry = {**_signature(ep, ins, outs), "files": []}
    if fmt in ("torch", "both"):
        torch.export.save(ep, out_dir / f"{name}.pt2")
        entry["files"].append(f"{name}.pt2")
    if fmt in ("onnx", "both"):
        quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]  # notes from the graph optimiser
        levels = [q.level for q in quiet]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on renamed axes and missing torchvision
            for q in quiet:
                q.setLevel(logging.ERROR)
            try:
                onnx = torch.onnx.export(ep, input_names=list(ins), output_names=list(outs), dynamo=True,
                                         verbose=False)
            finally:
                for q, level in zip(quiet, levels, strict=True):
                    q.setLevel(level)
        onnx.save(str(out_dir / f"{name}.onnx"))
        entry["files"].append(f"{name}.onnx")
    return entry
