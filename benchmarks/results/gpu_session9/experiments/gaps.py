"""Where the paper step's GPU idles: host syncs, gaps between kernels, and host issue time."""
import sys, time, warnings
sys.path.insert(0, "benchmarks")
import torch
from torch.autograd import DeviceType
from bench_train import Trainer, synthetic_batch

tr = Trainer("paper", 200, "fused")
bs = [synthetic_batch(tr.cfg, 128, 200, 8, s) for s in range(3)]
for i in range(4):
    tr.step(bs[i % 3])
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    tr.step(bs[0])
    torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode(0)
syncs = [str(x.message)[:200] for x in w if "synchron" in str(x.message).lower()]
print("host syncs in one step:", len(syncs))
for s in syncs[:10]:
    print("   ", s)
t0 = time.perf_counter()
for i in range(10):
    tr.step(bs[i % 3])
t1 = time.perf_counter()
torch.cuda.synchronize()
t2 = time.perf_counter()
print(f"host issue {1e3*(t1-t0)/10:.1f} ms/step, wall {1e3*(t2-t0)/10:.1f} ms/step")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
    for i in range(3):
        tr.step(bs[i % 3])
    torch.cuda.synchronize()
ks = sorted([e for e in prof.events() if e.device_type == DeviceType.CUDA], key=lambda e: e.time_range.start)
gaps = []
for a, b in zip(ks, ks[1:]):
    g = b.time_range.start - a.time_range.end
    if g > 0:
        gaps.append((g, a.name[:60], b.name[:60]))
span = ks[-1].time_range.end - ks[0].time_range.start
idle = sum(g for g, _, _ in gaps)
print(f"3 steps: span {span/1e3:.1f} ms, idle {idle/1e3:.2f} ms, kernels {len(ks)}")
big = sorted(gaps, reverse=True)[:20]
for g, a, b in big:
    print(f"  {g/1e3:7.3f} ms after {a} | before {b}")
small = sum(g for g, _, _ in gaps if g < 20)
print(f"gaps < 20 us: {small/1e3:.2f} ms total over {sum(1 for g,_,_ in gaps if g < 20)}")
