"""How far the Triton backend's gradients are from the reference, on real batches.

For the first few training batches of a prepared data set, the same weights are run through the
reference backend in fp32 and then through the reference under bf16 autocast, triton in fp32 and
triton under bf16 autocast; for each parameter group the table gives the relative error
||g - g_ref|| / ||g_ref|| (worst batch). The f_b tables start at random values, not at zero, so
their gradients are not degenerate. Dropout is off (eval mode) so every run computes the same
function.

Read it as: triton fp32 should match to ~1e-6 (same maths, other summation order); triton bf16
should sit where reference bf16 sits, since both round the same activations to bf16. A triton
bf16 error well above the reference's would point at the kernels rather than at bf16.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here), which
mishandles bf16 dots, so only the fp32 columns are run there, and slowly: use a small batch.

    python benchmarks/grad_agreement.py --data DIR [--batch-size 256] [--batches 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before climber imports Triton

from climber import ops  # noqa: E402
from climber.config import model_config  # noqa: E402
from climber.data.sumi import SumiData  # noqa: E402
from climber.train import build_model, loader, masked_bce, to_device  # noqa: E402


def group(name: str) -> str:
    """Parameter name -> its row in the table (the layers pooled, parameter by parameter)."""
    if name.startswith("layers."):
        return "layers.*." + name.split(".", 2)[2]
    return name if name.endswith("_bias") else name.split(".")[0]


def gradients(model, b: dict, weights: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(b["user"].device.type, dtype=torch.bfloat16, enabled=bf16):
        masked_bce(model(b), b, weights).backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_errors(g: dict, ref: dict) -> dict[str, float]:
    """Per group: ||g - ref|| / ||ref||; a gradient missing from g counts as error 1."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for n, r in ref.items():
        k = group(n)
        diff = g[n] - r if n in g else r
        num[k] = num.get(k, 0.0) + diff.square().sum().item()
        den[k] = den.get(k, 0.0) + r.square().sum().item()
    return {k: (num[k] / max(den[k], 1e-30)) ** 0.5 for k in num}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a prepared data set (climber prepare)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the JSON line here")
    args = ap.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # an exact fp32 reference
    data = SumiData(args.data)
    cfg = model_config(args.preset, data.vocab, tuple(data.meta["strategies"]), d_model=args.d_model,
                       n_layers=args.n_layers)
    ref = build_model(cfg, data, 0).to(dev).eval()
    with torch.no_grad():
        ref.pos_bias.normal_(0, 0.3)
        ref.time_bias.normal_(0, 0.3)
    fused = build_model(cfg, data, 0).to(dev).eval()
    fused.load_state_dict(ref.state_dict())
    fused.attention = ops.backend("triton", dev)
    weights = torch.full((len(data.tasks),), 1.0 / len(data.tasks), device=dev)
    runs = {"reference bf16": (ref, True), "triton fp32": (fused, False), "triton bf16": (fused, True)}
    if dev.type == "cpu":
        runs = {"triton fp32": runs["triton fp32"]}

    worst: dict[str, dict[str, float]] = {name: {} for name in runs}
    batches = loader(data, data.requests("train")[: args.batch_size * args.batches], args.batch_size, cfg)
    for b in batches:
        b = to_device(b, dev)
        g_ref = gradients(ref, b, weights, bf16=False)
        for name, (model, bf16) in runs.items():
            for k, e in relative_errors(gradients(model, b, weights, bf16), g_ref).items():
                worst[name][k] = max(worst[name].get(k, 0.0), e)

    groups = list(next(iter(worst.values())))
    print(f"relative gradient error against reference fp32, worst of {args.batches} batches of {args.batch_size} "
          f"({data.meta['name']}, d {args.d_model}, {args.n_layers} layers, {dev.type})")
    print(f"{'parameters':28s}" + "".join(f"{name:>13s}" for name in runs))
    for k in groups:
        print(f"{k:28s}" + "".join(f"{worst[name][k]:13.2e}" for name in runs))
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    line = json.dumps({"name": "grad_agreement", "device": device,
                       "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
                       "max_relative_error": {name: max(v.values()) for name, v in worst.items()},
                       "by_group": worst})
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
