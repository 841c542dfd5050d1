"""Whole training-step throughput on one GPU: SUMI against one candidate per sample (docs/paper.md
3.1, "single user, multiple items"), training MFU and peak memory.

A step is what `climber.train` runs: bf16 autocast forward, per-task BCE over the candidates,
backward, gradient clipping and fused AdamW, with the runtime's regional compile
(`climber/runtime.py`) and the attention backend named by --impl ("triton", the default, or
"reference"). Batches are synthetic, random and built on the GPU (full-length histories, every
candidate valid), so no data loader is timed.

SUSI ("single user, single item"): each of a request's m candidates is its own sample with the
full history, i.e. a SUMI batch with M = 1; at the same number of samples per step its
throughput in (user, item) pairs per second does not depend on m. SUMI packs m candidates
after one history, so the speedup is SUMI pairs/s over SUSI pairs/s at the same batch size.

MFU = 3 x forward FLOPs (`Climber.flops(L, M)["exact"]` per request: the dense ATL matmuls,
full L^2 attention though only the causal half is computed, BGF and head) per second, over the
H100/H200 spec bf16 dense peak (989 TFLOP/s, the convention of PaLM and torchtitan) and over the
bf16 matmul rate measured on the H200 (790 TFLOP/s).

    python benchmarks/bench_train.py [--out benchmarks/results/train_step] [--profile]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

from climber.config import ModelConfig
from climber.model import Climber
from climber.runtime import Runtime, apply
from climber.train import masked_bce, param_groups

PEAK_FLOPS = 790e12  # bf16 dense matmul, measured on the H200
SPEC_PEAK_FLOPS = 989e12  # H100 / H200 SXM spec, bf16 dense
SIZES = {  # d_model, heads, layers; 4 blocks (MSE strategies) in both
    "small": dict(d_model=256, n_heads=4, n_layers=4),
    "paper": dict(d_model=512, n_heads=8, n_layers=12),  # Climber-large's depth, 4 x 200 tokens
}


def environment(argv: list[str]) -> dict:
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "command": "python " + " ".join(argv)}


def model_config(size: str, L: int) -> ModelConfig:
    return ModelConfig(n_items=100_000, n_users=10_000, tasks=("click", "like"), n_actions=4, n_scenarios=3,
                       item_feature_cards=(100,), user_feature_cards=(10,), strategies=("recent",) * 4, seq_len=L,
                       **SIZES[size])


def synthetic_batch(cfg: ModelConfig, B: int, L: int, M: int, seed: int) -> dict:
    """Random SUMI batch on the GPU: B requests, K blocks of L events each, M candidates."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    K, T = cfg.n_blocks, len(cfg.tasks)

    def ints(high, *shape):
        return torch.randint(0, high, shape, device="cuda", generator=g)

    time = torch.sort(ints(10**8, B, K, L), dim=-1).values
    return {"user": ints(cfg.n_users, B), "req_time": time[:, :, -1].amax(-1) + 1,
            "req_scenario": ints(cfg.n_scenarios, B), "hist_item": ints(cfg.n_items - 2, B, K, L) + 2,
            "hist_time": time, "hist_action": ints(cfg.n_actions, B, K, L),
            "hist_scenario": ints(cfg.n_scenarios, B, K, L), "hist_labels": ints(2, B, K, L, T),
            "hist_mask": torch.ones(B, K, L, dtype=torch.bool, device="cuda"),
            "cand_item": ints(cfg.n_items - 2, B, M) + 2,
            "cand_mask": torch.ones(B, M, dtype=torch.bool, device="cuda"), "labels": ints(2, B, M, T).float()}


def kernel_events(prof) -> list:
    """Device kernels of a profile: rows with device time launched by no recorded CPU op (with
    CPU ops recorded, an op's row also counts the kernels it launched), less the `## Call
    CompiledFxGraph` and `Optimizer.step` annotation ranges, which span the kernels they contain."""
    return [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.cpu_time_total == 0
            and not e.key.startswith("## ") and not e.key.startswith("Optimizer.")]


def kernel_kind(name: str) -> str:
    """A device kernel's kind, by its name, for the profile's summary."""
    kinds = [("matmul (cuBLAS)", ("nvjet", "gemm", "cutlass", "sm90_xmma")),
             ("attention kernels", ("_fwd_kernel", "_bwd_delta_kernel", "_bwd_kernel")),
             ("f_b build and table reduction", ("_bias_fwd_kernel", "_bias_grad_kernel")),
             ("compiled (inductor) kernels", ("triton_",)), ("optimizer", ("adam", "multi_tensor"))]
    for kind, keys in kinds:
        if any(k in name.lower() for k in keys):
            return kind
    return "other eager kernels"


class Trainer:
    """One model + fused AdamW; `rate` times training steps on synthetic batches."""

    def __init__(self, size: str, L: int, impl: str):
        gc.collect()  # earlier trainers (reference cycles through their compiled layers)
        torch.cuda.empty_cache()
        self.base = torch.cuda.memory_allocated()  # whatever is still held, left out of the peaks
        self.cfg, self.impl = model_config(size, L), impl
        torch.manual_seed(0)
        self.model = Climber(self.cfg).train()
        apply(self.model, Runtime(device="cuda", attention=impl, compile=True))
        self.opt = torch.optim.AdamW(param_groups(self.model, 0.01), lr=1e-4, betas=(0.9, 0.98), fused=True)
        T = len(self.cfg.tasks)
        self.weights = torch.full((T,), 1.0 / T, device="cuda")

    def step(self, b: dict) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = masked_bce(self.model(b), b, self.weights)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()

    def rate(self, B: int, M: int, steps: int, warmup: int = 3) -> dict:
        L = self.cfg.seq_len
        batches = [synthetic_batch(self.cfg, B, L, M, seed) for seed in range(3)]
        torch.cuda.reset_peak_memory_stats()
        for i in range(warmup):  # compilation happens here
            self.step(batches[i % 3])
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            self.step(batches[i % 3])
        end.record()
        end.synchronize()
        s = start.elapsed_time(end) / 1e3 / steps
        # device busy time per step: the kernels' summed durations (one stream) over a few steps;
        # about step_ms when the GPU, not the CPU launching its kernels, is the bound
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                self.step(batches[i % 3])
            torch.cuda.synchronize()
        busy = sum(e.self_device_time_total for e in kernel_events(prof)) / 3 / 1e3
        flops = 3 * self.model.flops(L, M)["exact"] * B
        row = {"L": L, "M": M, "B": B, "step_ms": s * 1e3, "busy_ms": busy,
               "pairs_per_s": B * M / s, "requests_per_s": B / s, "model_tflops": flops / s / 1e12,
               "mfu": flops / s / PEAK_FLOPS, "mfu_spec": flops / s / SPEC_PEAK_FLOPS,
               "peak_gib": (torch.cuda.max_memory_allocated() - self.base) / 2**30}
        print(f"d={self.cfg.d_model} {self.impl}: {row}", flush=True)
        return row

    def profile(self, B: int, M: int, path: Path) -> list[dict]:
        """Top device ops of two steps (after warm-up), written as a table to `path`."""
        batches = [synthetic_batch(self.cfg, B, self.cfg.seq_len, M, seed) for seed in range(2)]
        for b in batches:
            self.step(b)
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for b in batches:
                self.step(b)
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = kernel_events(prof) or list(events)
        total = sum(e.self_device_time_total for e in kernels)
        ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)
        top = ranked[:15]
        # which torch ops (with their input shapes) launch the time: eager copies are found here
        by_op = prof.key_averages(group_by_input_shape=True)
        n = len(batches)  # steps profiled
        shares: dict[str, float] = {}
        for e in kernels:
            kind = kernel_kind(e.key)
            shares[kind] = shares.get(kind, 0.0) + e.self_device_time_total / n / 1e3
        lines = [f"{ms:8.2f} ms  {kind}" for kind, ms in sorted(shares.items(), key=lambda kv: -kv[1])]
        lines += ["", "Every device kernel, ms per step:"]
        lines += [f"{e.self_device_time_total / n / 1e3:8.3f} {e.count // n:5d}  {e.key[:150]}" for e in ranked]
        path.write_text("Device time per step by kind:\n" + "\n".join(lines) + "\n\nDevice kernels:\n"
                        + events.table(sort_by="self_cuda_time_total", row_limit=40)
                        + "\nTorch ops by input shape (device time they launch):\n"
                        + by_op.table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=40,
                                      max_shapes_column_width=120) + "\n")
        return [{"op": e.key[:120], "share": e.self_device_time_total / total, "calls": e.count} for e in top]


def print_tables(sumi: list[dict], mfu: list[dict], profile: list[dict]) -> None:
    print(f"{'size':6} {'L':>4} {'m':>3} {'B':>4} {'SUMI pairs/s':>13} {'SUSI pairs/s':>13} {'speedup':>8} "
          f"{'MFU':>6} {'peak GiB':>9}")
    for r in sumi:
        s = r["sumi"]
        print(f"{r['size']:6} {s['L']:4d} {r['m']:3d} {s['B']:4d} {s['pairs_per_s']:13,.0f} "
              f"{r['susi']['pairs_per_s']:13,.0f} {r['speedup']:8.2f} {s['mfu']:6.1%} {s['peak_gib']:9.1f}")
    print(f"\n{'size':6} {'impl':6} {'L':>4} {'m':>3} {'B':>4} {'step ms':>8} {'busy ms':>8} "
          f"{'model TFLOP/s':>14} {'MFU':>6} {'MFU spec':>8} {'peak GiB':>9}")
    for r in mfu:
        if "error" in r:
            print(f"{r['size']:6} {r['impl']:6} m={r['M']}: {r['error']}")
            continue
        print(f"{r['size']:6} {r['impl']:6} {r['L']:4d} {r['M']:3d} {r['B']:4d} "
              f"{r['step_ms']:8.1f} {r['busy_ms']:8.1f} {r['model_tflops']:14.1f} {r['mfu']:6.1%} "
              f"{r['mfu_spec']:8.1%} {r['peak_gib']:9.1f}")
    for p in profile:
        print(f"{p['share']:6.1%} {p['calls']:5d}  {p['op']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,4,8,16", help="candidates per request")
    ap.add_argument("--batch", default="200:256,800:64", help="L:requests per step for the SUMI/SUSI table")
    ap.add_argument("--paper-batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--impl", default="triton", help="attention backend for the SUMI/SUSI table and the profile")
    ap.add_argument("--mfu-impls", default="triton", help="attention backends timed at the paper config")
    ap.add_argument("--paper-ms", default="1,8", help="candidates per request at the paper config")
    ap.add_argument("--reference", action="store_true", help="also time the paper config with the reference backend")
    ap.add_argument("--profile", action="store_true", help="profile the paper config, m = 8")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step"))
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    ms = [int(m) for m in args.ms.split(",")]
    result = {"name": "bench_train", **environment(sys.argv), "peak_flops": PEAK_FLOPS,
              "spec_peak_flops": SPEC_PEAK_FLOPS, "sumi_vs_susi": [],
              "mfu": [], "profile_top_ops": []}

    def save() -> None:  # after every section, so a run cut short keeps what it measured
        (args.out / "bench_train.json").write_text(json.dumps(result, indent=1) + "\n")

    for item in filter(None, args.batch.split(",")):  # small model: SUMI at each m, SUSI = M = 1 at the same batch
        L, B = map(int, item.split(":"))
        trainer = Trainer("small", L, args.impl)
        rows = {m: trainer.rate(B, m, args.steps) for m in sorted(set(ms) | {1})}
        for m in ms:
            result["sumi_vs_susi"].append({"size": "small", "m": m, "sumi": rows[m], "susi": rows[1],
                                           "speedup": rows[m]["pairs_per_s"] / rows[1]["pairs_per_s"]})
        del trainer
        save()

    for impl in filter(None, args.mfu_impls.split(",")):
        trainer = Trainer("paper", 200, impl)
        for m in map(int, args.paper_ms.split(",")):
            try:
                result["mfu"].append({"size": "paper", "impl": impl, **trainer.rate(args.paper_batch, m, args.steps)})
            except Exception as e:  # e.g. out of memory: a result too
                result["mfu"].append({"size": "paper", "impl": impl, "M": m, "error": f"{type(e).__name__}: {e}"[:500]})
                print(result["mfu"][-1], flush=True)
        save()
        if args.profile and impl == args.impl:
            result["profile_top_ops"] = trainer.profile(args.paper_batch, 8, args.out / "bench_train_profile.txt")
            save()
        del trainer
    if args.reference:
        trainer = Trainer("paper", 200, impl="reference")
        result["mfu"].append({"size": "paper", "impl": "reference", **trainer.rate(args.paper_batch, 8, args.steps)})
        del trainer
        save()

    print_tables(result["sumi_vs_susi"], result["mfu"], result["profile_top_ops"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
