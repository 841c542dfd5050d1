#!/usr/bin/env bash
# Scaling grid on synthetic data on one GPU (docs/paper.md section 4; docs/scaling.md): generate a
# synthetic log with long histories, sweep Climber, Transformer and DLRM over lengths
# {50,100,200,400} x layers {1,2,4,8} (DLRM has no layers: lengths only; 36 runs, 1 epoch each,
# d_model 64), fit the curves and plan sizes for a few FLOPs budgets.
#
# Sized for ~8 minutes on one H200, from an estimate, not a measurement: the L^2 attention of
# the plain PyTorch path dominates (measured at ~3.2e-10 s per attention score, forward and
# backward), about 10 ms per training request for the whole grid, so ~30k training requests
# (200 users, median 1,000 events) take ~5-6 minutes, plus ~5 s of overhead per run.
#
# Resumable: the data, run directories and results file live in WORK (default
# /tmp/scaling_synthetic_gpu), so on the same machine a second call skips finished runs; the
# results file is copied to OUT after every run, and the fit and plans are written to OUT.
#
#   bash benchmarks/run_scaling_gpu.sh [OUT]     (default OUT: benchmarks/results/scaling/synthetic-gpu)
#
# It calls the library functions behind `climber prepare synthetic` and `climber scale
# sweep|fit|plan` instead of the `climber` command, because the command imports the serving
# stack (fastapi, uvicorn), which the GPU image does not have. Sizes can be overridden from the
# environment for a dry run on CPU (e.g. USERS=30 EVENTS=80 LENGTHS="8 16" LAYERS="1 2" DEVICE=cpu
# WORKERS=0 PYTHON=.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/scaling/synthetic-gpu}
WORK=${WORK:-/tmp/scaling_synthetic_gpu}
PYTHON=${PYTHON:-python3}
export USERS=${USERS:-200} EVENTS=${EVENTS:-1000} ITEMS=${ITEMS:-20000} TOPICS=${TOPICS:-50} SEED=${SEED:-0}
export LENGTHS=${LENGTHS:-"50 100 200 400"} LAYERS=${LAYERS:-"1 2 4 8"} MODELS=${MODELS:-"climber transformer dlrm"}
export DEVICE=${DEVICE:-cuda} WORKERS=${WORKERS:-8} BATCH=${BATCH:-256} EPOCHS=${EPOCHS:-1}
export OUT WORK PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
{ echo "bash benchmarks/run_scaling_gpu.sh $*"; echo "started $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true
  env | grep -E '^(USERS|EVENTS|ITEMS|TOPICS|SEED|LENGTHS|LAYERS|MODELS|DEVICE|WORKERS|BATCH|EPOCHS)=' | sort
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git)"; } > "$OUT/environment.txt"

"$PYTHON" - <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import dataclasses, json, os, shutil, time
from pathlib import Path

import torch

from climber.config import TrainConfig
from climber.data.sumi import prepare
from climber.data.synthetic import PREPARE, STRATEGIES, SyntheticConfig, generate
from climber.scaling.fit import crossover_text, fit_report
from climber.scaling.planner import plan, plan_text
from climber.scaling.sweep import Grid, sweep

env = os.environ
out, work = Path(env["OUT"]), Path(env["WORK"])
data, results = work / "data", work / "results.jsonl"
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}", flush=True)
t0 = time.time()
if not (data / "meta.json").exists():  # `climber prepare synthetic --eval-requests 3 ...`
    cfg = SyntheticConfig(users=int(env["USERS"]), events_per_user=int(env["EVENTS"]), items=int(env["ITEMS"]),
                          topics=int(env["TOPICS"]), seed=int(env["SEED"]))
    # three requests per user for validation and three for test: steadier AUCs with few users
    meta = prepare(generate(cfg), data, dataclasses.replace(PREPARE, eval_requests=3), STRATEGIES)
    print(f"synthetic data in {time.time() - t0:.0f}s: {json.dumps(meta['counts'])}, positive rates "
          f"{json.dumps(meta['positive_rate'])}", flush=True)
grid = Grid(models=tuple(env["MODELS"].split()), lengths=tuple(int(v) for v in env["LENGTHS"].split()),
            layers=tuple(int(v) for v in env["LAYERS"].split()), preset="small")
tcfg = TrainConfig(epochs=int(env["EPOCHS"]), batch_size=int(env["BATCH"]), warmup_steps=50, device=env["DEVICE"],
                   num_workers=int(env["WORKERS"]), log_every=50)


def log(msg: str) -> None:  # after each run, OUT gets the results so far (a call may hit its time limit)
    print(msg, flush=True)
    if results.exists():
        shutil.copy(results, out / "results.jsonl")


rows = sweep(data, results, grid, tcfg, work / "runs", log=log)
shutil.copy(results, out / "results.jsonl")
print(f"sweep done at {time.time() - t0:.0f}s", flush=True)
s = fit_report(rows, out)
for name, c in s["crossovers"].items():
    print(crossover_text(c, *name.split(" vs ")))
flops = sorted(r["flops"]["exact"] for r in rows if r["model"] == "climber")
with (out / "plans.txt").open("w") as f:
    for budget in (flops[len(flops) // 4], flops[len(flops) // 2], flops[3 * len(flops) // 4]):
        text = plan_text(plan(rows, float(f"{budget:.2g}")))
        print(text + "\n")
        f.write(text + "\n\n")
print(f"done in {time.time() - t0:.0f}s", flush=True)
EOF
