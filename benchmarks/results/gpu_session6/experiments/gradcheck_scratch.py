"""Per-parameter gradient error of fused vs split on real LastFM batches, GPU."""
import dataclasses, sys, json
sys.path.insert(0, "scratch")
import variants
import torch
from climber.cli import model_config  # noqa
from climber.config import ModelConfig, TrainConfig, model_config
from climber.data.sumi import SumiData
from climber.train import build_model, loader, to_device, masked_bce

data = SumiData(sys.argv[1])
mcfg = model_config("small", data.vocab, tuple(data.meta["strategies"]), d_model=128, n_layers=8, attention="split")
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BS = int(sys.argv[2]) if len(sys.argv) > 2 else 256
torch.backends.cuda.matmul.allow_tf32 = False
ref = build_model(mcfg, data, 0).to(dev).eval()
# perturb tables so their gradients are not at the symmetric init
with torch.no_grad():
    ref.pos_bias.normal_(0, 0.3); ref.time_bias.normal_(0, 0.3)
fcfg = dataclasses.replace(mcfg, attention="fused")
fus = build_model(fcfg, data, 0).to(dev).eval()
fus.load_state_dict(ref.state_dict())
weights = torch.tensor([1.0 / len(data.tasks)] * len(data.tasks), device=dev)

def grads(model, b, bf16):
    model.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        loss = masked_bce(model(b), b, weights)
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}

def group(n):
    if n.startswith("layers."):
        parts = n.split(".")
        return "layers.*." + ".".join(parts[2:])
    return n.split(".")[0] if not n.endswith("_bias") else n

def compare(g, gr):
    out = {}
    for n, r in gr.items():
        k = group(n)
        x = g.get(n)
        e = float("nan") if x is None else (x - r).norm().item()
        a = out.setdefault(k, [0.0, 0.0])
        a[0] += e ** 2; a[1] += r.norm().item() ** 2
    return {k: (v[0] ** 0.5) / max(v[1] ** 0.5, 1e-30) for k, v in out.items()}

it = iter(loader(data, data.requests("train")[:2048], BS, mcfg))
for bi in range(3):
    b = to_device(next(it), dev)
    print(f"batch {bi}: hist {tuple(b['hist_item'].shape)} cand {tuple(b['cand_item'].shape)} cand valid {b['cand_mask'].float().mean():.2f} hist valid {b['hist_mask'].float().mean():.2f}", flush=True)
    l0, g32 = grads(ref, b, False)
    res = {}
    for name, model, bf in (("split_bf16", ref, True), ("fused_fp32", fus, False), ("fused_bf16", fus, True)) if dev.type == "cuda" else (("fused_fp32", fus, False),):
        l, g = grads(model, b, bf)
        res[name] = (l - l0, compare(g, g32))
    keys = list(next(iter(res.values()))[1])
    print(f"{'param':34s} " + " ".join(f"{n:>12s}" for n in res))
    print(f"{'loss diff':34s} " + " ".join(f"{res[n][0]:12.2e}" for n in res))
    for k in keys:
        print(f"{k:34s} " + " ".join(f"{res[n][1][k]:12.2e}" for n in res))
