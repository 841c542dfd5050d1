"""The ATL attention alone (docs/paper.md 2.3), on one GPU: the backends of `climber/ops`.

Variants on the same (B*K, H, L, dh) problems, bf16 q, k, v:
  flash          SDPA flash attention, causal, no bias, no temperature: the ceiling.
  triton         the "triton" backend: `prepare` (the dense f_b built from the tables), `attend`
                 (forward; backward with dK, dV, d bias, d(1/tau) and dQ), then d bias reduced
                 into the tables.
  triton-kernel  the Triton attention kernels alone: f_b prepared beforehand, as the model does
                 once per step for all its layers (its gradient is made, not reduced).
  reference      the "reference" backend: dense bias, fp32 softmax, plain matmuls, and
                 backward the bias's gradient into the tables.
Everything runs under bf16 autocast, as in training. "fwd" is the forward with gradients
enabled (as in training), "fwd+bwd" adds the backward. TFLOP/s counts the causal work only,
4 * L (L + 1) / 2 * dh per (sample, head) forward and 2.5x that backward, the same for every
variant; "of flash" is flash time / variant time.

    python benchmarks/bench_attention.py [--out benchmarks/results/attention_kernel]
    python benchmarks/bench_attention.py --sweep [--shapes ...]   # tile configs of the kernels

`--sweep` times each Triton kernel (triton-kernel's fwd+bwd under the profiler) for each
(query rows, key columns, warps, stages) in SWEEP and prints the best per kernel; "all ms" is
every kernel of the fwd+bwd (the small fills and the bias grad's zeros included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from climber import ops
from climber.ops import reference, triton_attention

VARIANTS = ("flash", "triton", "triton-kernel", "reference")
SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 128, 4, 2),
         (32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 4, 3), (16, 128, 4, 2)]
KERNELS = {"fwd": "_fwd_kernel", "bwd": "_bwd_kernel", "delta": "_bwd_delta_kernel"}  # delta: on fwd's row tiles


def environment(argv: list[str]) -> dict:
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "command": "python " + " ".join(argv)}


def problem(BK: int, H: int, L: int, dh: int, K: int = 4, P: int = 32, T: int = 32, S: int = 3, seed: int = 0):
    """Random bf16 q, k, v (B, K, H, L, dh), temperatures, f_b tables and full histories."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = BK // K
    q, k, v = (torch.randn(B, K, H, L, dh, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    tau = torch.rand(B, K, H, 1, 1, device="cuda", generator=g) + 4.0  # about sqrt(dh)
    pos_table = torch.randn(K, S, H, P, device="cuda", generator=g) * 0.5
    time_table = torch.randn(K, S, H, T, device="cuda", generator=g) * 0.5
    time = torch.sort(torch.randint(0, 10**8, (B, K, L), device="cuda", generator=g), dim=-1).values
    scenario = torch.randint(0, S, (B,), device="cuda", generator=g)
    hist_mask = torch.ones(B, K, L, dtype=torch.bool, device="cuda")
    return dict(q=q, k=k, v=v, tau=tau, pos_table=pos_table, time_table=time_table, time=time, scenario=scenario,
                hist_mask=hist_mask)


def make_case(variant: str, x: dict):
    """(forward closure, leaves that take gradients) for one variant on problem `x`."""
    frozen = variant == "flash"
    if frozen:  # flash reads q, k, v (B*K, H, L, dh) contiguous; the others the packed projections
        leaves = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v")}
    else:  # packed (K, B, L, 3, H, dh), contiguous, as the model's qkv projection leaves them
        leaves = {"qkv": torch.stack([x[n].transpose(2, 3) for n in "qkv"], dim=3).transpose(0, 1).contiguous()
                  .requires_grad_()}
    leaves.update({n: x[n].clone().requires_grad_(not frozen) for n in ("tau", "pos_table", "time_table")})
    B, K, H, L, dh = x["q"].shape
    backend = ops.REFERENCE if variant == "reference" else ops.TRITON
    i = torch.arange(L, device="cuda")
    pb = reference.position_buckets(i[:, None] - i[None, :], x["pos_table"].shape[-1])
    tb = reference.time_buckets(x["time"][..., :, None] - x["time"][..., None, :], x["time_table"].shape[-1])

    def prepare():
        s = x["scenario"]
        pos, tim = (leaves[n][:, s].transpose(0, 1) for n in ("pos_table", "time_table"))  # (B, K, H, N)
        return backend.prepare(pos, tim, pb, tb, x["hist_mask"], L, torch.bfloat16)

    if variant == "triton-kernel":  # f_b as a leaf: its gradient is made by the kernels, not reduced
        built = prepare()
        built.bias = built.bias.detach().requires_grad_()
        leaves["bias"] = built.bias

    def fwd():
        if variant == "flash":  # no bias, no mask, no temperature: nothing to build
            with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(*(leaves[n].view(B * K, H, L, dh) for n in "qkv"),
                                                      is_causal=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            seq = built if variant == "triton-kernel" else prepare()
            return backend.attend(leaves["qkv"], leaves["tau"][..., 0, 0].reciprocal(), seq)[0]

    return fwd, leaves


def timed(fn, reps: int) -> float:
    """Median milliseconds over `reps` runs after 3 warm-ups (compilation happens there)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn) -> float:
    """Peak memory above what was allocated before one call, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_variant(variant: str, x: dict, reps: int) -> list[dict]:
    fwd, leaves = make_case(variant, x)
    grad = torch.randn_like(fwd())

    def fwd_bwd():
        for p in leaves.values():
            p.grad = None
        fwd().backward(grad)

    BK, H, L, dh = x["q"].shape[0] * x["q"].shape[1], *x["q"].shape[2:]
    flops = 4 * BK * H * dh * L * (L + 1) / 2
    rows = []
    for mode, fn, f in (("fwd", fwd, flops), ("fwd+bwd", fwd_bwd, 3.5 * flops)):
        ms = timed(fn, reps)
        rows.append({"variant": variant, "BK": BK, "H": H, "L": L, "dh": dh, "mode": mode, "ms": ms,
                     "tflops": f / ms / 1e9, "peak_mib": peak_mib(fn)})
    return rows


def sweep(x: dict, reps: int) -> list[dict]:
    """Per-kernel device time (ms, mean over `reps` profiled fwd+bwd runs) for each tile config."""

    default = dict(triton_attention.TILES)
    rows = []
    for tiles in SWEEP:
        triton_attention.TILES.update({k: tiles for k in default})
        try:
            fwd, leaves = make_case("triton-kernel", x)
            grad = torch.randn_like(fwd())
            for _ in range(3):  # compile
                fwd().backward(grad)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    fwd().backward(grad)
                torch.cuda.synchronize()
            times = {e.key: e.self_device_time_total / reps / 1e3 for e in prof.key_averages()}
            row = {"tiles": tiles, **{k: times.get(name, float("nan")) for k, name in KERNELS.items()},
                   "all_ms": sum(e.self_device_time_total for e in prof.key_averages()) / reps / 1e3}
        except Exception as e:  # e.g. out of shared memory: a result too
            row = {"tiles": tiles, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
        print(row, flush=True)
    triton_attention.TILES.update(default)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="256x8x200x64,64x8x800x64", help="BKxHxLxdh, comma separated")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_kernel"))
    ap.add_argument("--sweep", action="store_true", help="time the kernels' tile configs instead")
    args = ap.parse_args()
    if args.sweep:
        result = {"name": "bench_attention_sweep", **environment(sys.argv), "results": []}
        for shape in args.shapes.split(","):
            rows = sweep(problem(*map(int, shape.split("x"))), args.reps)
            print(f"{shape}: {'tiles':18} {'fwd ms':>8} {'bwd ms':>8} {'delta ms':>8} {'all ms':>8}")
            for r in rows:
                print(f"{'':{len(shape)}}  {str(r['tiles']):18} " + (r["error"] if "error" in r else
                      " ".join(f"{r[k]:8.3f}" for k in (*KERNELS, "all_ms"))))
            ok = [r for r in rows if "error" not in r]
            best = {k: min(ok, key=lambda r: r[k])["tiles"] for k in KERNELS} if ok else {}
            print(f"best: {best}")
            result["results"].append({"shape": shape, "rows": rows, "best": best})
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_attention_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
        return
    rows = []
    for shape in args.shapes.split(","):
        x = problem(*map(int, shape.split("x")))
        for variant in args.variants.split(","):
            try:
                rows += run_variant(variant, x, args.reps)
                print(rows[-2], rows[-1], sep="\n", flush=True)
            except Exception as e:  # an out-of-memory or failing variant is a result too
                rows.append({"variant": variant, "shape": shape, "error": f"{type(e).__name__}: {e}"[:300]})
                print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    flash = {(r["L"], r["mode"]): r["ms"] for r in rows if r.get("variant") == "flash"}
    print(f"{'variant':12} {'BKxHxLxdh':16} {'mode':8} {'ms':>8} {'TFLOP/s':>8} {'of flash':>8} {'peak MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:12} {r['shape']:16} {r['error']}")
            continue
        r["of_flash"] = flash.get((r["L"], r["mode"]), float("nan")) / r["ms"]
        shape = f"{r['BK']}x{r['H']}x{r['L']}x{r['dh']}"
        print(f"{r['variant']:12} {shape:16} {r['mode']:8} {r['ms']:8.3f} {r['tflops']:8.1f} {r['of_flash']:8.2f} "
              f"{r['peak_mib']:9.0f}")
    result = {"name": "bench_attention", **environment(sys.argv), "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_attention.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
