"""The learned attention temperatures of a Climber checkpoint (docs/paper.md section 2.3): the
ATL's f_tc(layer, block, scenario) = exp(log_tau) per head, and BGF's per (scenario, head).

A model trained with the scenario axis (`scenario_adaptive`, the default) has one temperature per
(layer, block, scenario, head); the `climber-shared-tau` row one per (layer, block, head), drawn
as scenario "all"; the MSE-only ablation keeps the initial sqrt(d_head) (not trained). tau above
sqrt(d_head) flattens a head's attention over the history, below it sharpens it: on the
synthetic set with `--scenario-recency`, search (scenario 1) should attend more sharply to
recent events than the daily mix (scenario 2).

    python -m benchmarks.plot_temperatures --checkpoint RUN/best --out DIR

writes DIR/temperatures.json (tau per [layer][block][scenario][head] and its mean over heads,
BGF's per [scenario][head]) and, with matplotlib (the [plot] extra), DIR/temperatures.png: one
panel per layer, the blocks (extraction strategies) along x, one line per scenario (mean over
heads; the heads as dots), and a last panel for BGF.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from climber.checkpoint import load_model
from climber.extras import MissingDependency, pyplot


def temperatures(model: torch.nn.Module) -> dict:
    """tau = exp(log_tau) of a Climber: "atl" [layer][block][scenario][head] (a shared axis has
    length 1), its mean over heads "atl_mean" [layer][block][scenario], and "bgf" [scenario][head]
    (None without BGF); with the labels of the blocks and scenarios."""
    cfg = model.cfg
    atl = model.log_tau.detach().float().exp()  # (N_L, K or 1, S or 1, H)
    blocks = list(cfg.strategies) if atl.shape[1] == cfg.n_blocks else ["all blocks"]
    scenarios = [str(s) for s in range(atl.shape[2])] if atl.shape[2] > 1 else ["all"]
    bgf = model.bgf.log_tau.detach().float().exp() if model.bgf is not None else None  # (S or 1, H)
    return {"blocks": blocks, "scenarios": scenarios, "sqrt_d_head": cfg.d_head**0.5, "trained": cfg.adaptive,
            "atl": atl.tolist(), "atl_mean": atl.mean(-1).tolist(), "bgf": None if bgf is None else bgf.tolist()}


def plot(t: dict, path: Path, title: str) -> None:
    plt = pyplot("the temperature plot")
    n_layers = len(t["atl"])
    panels = n_layers + (t["bgf"] is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels + 1, 3.4), squeeze=False, sharey=True)
    x = range(len(t["blocks"]))
    for i in range(n_layers):
        ax = axes[0, i]
        for s, name in enumerate(t["scenarios"]):
            line = ax.plot(x, [t["atl_mean"][i][k][s] for k in x], marker="o", label=f"scenario {name}")[0]
            for k in x:  # the heads
                ax.scatter([k] * len(t["atl"][i][k][s]), t["atl"][i][k][s], s=8, color=line.get_color(), alpha=0.4)
        ax.set_xticks(list(x), t["blocks"], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"ATL layer {i}")
    if t["bgf"] is not None:
        ax = axes[0, -1]
        for s, name in enumerate(t["scenarios"] if len(t["bgf"]) > 1 else ["all"]):
            ax.scatter([s] * len(t["bgf"][s]), t["bgf"][s], label=f"scenario {name}")
        ax.set_xticks(range(len(t["bgf"])), [f"s{s}" for s in range(len(t["bgf"]))])
        ax.set_title("BGF")
    for ax in axes[0]:
        ax.axhline(t["sqrt_d_head"], color="grey", lw=0.8, ls="--")  # the initial value
    axes[0, 0].set_ylabel("tau (line: mean over heads; dots: heads)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a Climber checkpoint, e.g. RUN/best")
    ap.add_argument("--out", type=Path, required=True, help="directory for temperatures.json and .png")
    ns = ap.parse_args(argv)
    model, config = load_model(ns.checkpoint)
    if model.cfg.arch != "climber":
        raise SystemExit(f"{ns.checkpoint}: arch {model.cfg.arch!r} has no attention temperatures")
    t = {"checkpoint": str(ns.checkpoint), "dataset": config.get("dataset"), **temperatures(model)}
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "temperatures.json").write_text(json.dumps(t, indent=2) + "\n")
    try:
        plot(t, ns.out / "temperatures.png", f"{config.get('dataset')}: {ns.checkpoint}")
    except MissingDependency as e:
        print(f"no plot: {e}")
    for i, layer in enumerate(t["atl_mean"]):  # a readable table: layer, block, tau per scenario
        for k, block in enumerate(t["blocks"]):
            print(f"layer {i} {block:>12}: " + "  ".join(f"s{s} {v:.3f}" for s, v in zip(t["scenarios"], layer[k])))
    return t


if __name__ == "__main__":
    main()
