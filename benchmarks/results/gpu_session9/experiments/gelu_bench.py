"""GELU variants on the paper step's FFN shape (4, 26624, 2048) bf16: compiled forward, and
forward + backward, against a copy (x * 2) as the memory bound."""
import json
import math
import torch
import torch.nn.functional as F

C = math.sqrt(8 / math.pi)


def sig_gelu(x):
    return x * torch.sigmoid(C * x * (1 + 0.044715 * x * x))


VARIANTS = {"copy": lambda x: x * 2, "erf": F.gelu, "tanh": lambda x: F.gelu(x, approximate="tanh"),
            "sigmoid": sig_gelu}


def timeit(fn, n=30):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[n // 2]


x = torch.randn(4, 26624, 2048, device="cuda", dtype=torch.bfloat16) * 2
g = torch.randn_like(x)
gb = (x.numel() * 2) / 1e9
out = {}
for name, f in VARIANTS.items():
    cf = torch.compile(f)
    fwd = timeit(lambda: cf(x))
    xr = x.detach().requires_grad_()
    def step():
        y = cf(xr)
        y.backward(g)
        xr.grad = None
    both = timeit(step)
    ref = F.gelu(x.float())
    err = (cf(x).float() - ref).abs().mean().item()
    out[name] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "fwd_TBps": 2 * gb / fwd, "mean_abs_vs_erf_fp32": err}
    print(f"{name:8s} fwd {fwd:.3f} ms ({2*gb/fwd:.2f} TB/s)  fwd+bwd {both:.3f} ms  err {err:.2e}", flush=True)
print(json.dumps(out))
