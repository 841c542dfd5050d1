#!/usr/bin/env bash
# Scaling grid on synthetic data on one GPU (docs/paper.md section 4; docs/scaling.md): generate a
# synthetic log with long histories, sweep Climber, the Transformer, HSTU and DLRM over lengths x
# layers (DLRM has no layers: lengths only), each run trained to its best validation point
# (validation twice an epoch, early stopping after PATIENCE validations without gain, an epoch
# cap EPOCHS), fit the curves and plan sizes for a few FLOPs budgets.
#
# The grid points run JOBS at a time (`sweep(shard=(i, JOBS))`: one process per shard, all
# appending to one results file under a lock): the models are small, so one process cannot keep
# the GPU busy. Resumable: the data, run directories and results file live in WORK (default
# /tmp/scaling_synthetic_gpu), so on the same machine a second call skips finished runs; a
# results file given as SEED_RESULTS (e.g. the one a previous, time-limited call wrote to OUT,
# carried to a fresh machine) is copied into WORK first, so its rows are skipped too (the data is
# regenerated identically from the seed, and a row's key hashes the data set's meta). The results
# are copied to OUT after every run, and the fit and plans are written to OUT at the end.
#
#   bash benchmarks/run_scaling_gpu.sh [OUT]     (default OUT: benchmarks/results/scaling/synthetic-gpu)
#
# It calls the library functions behind `climber prepare synthetic` and `climber scale
# sweep|fit|plan` instead of the `climber` command, because the command imports the serving
# stack (fastapi, uvicorn), which the GPU image does not have. Sizes can be overridden from the
# environment for a dry run on CPU (e.g. USERS=30 EVENTS=80 LENGTHS="8 16" LAYERS="1 2" DEVICE=cpu
# WORKERS=0 JOBS=2 EPOCHS=1 PYTHON=.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/scaling/synthetic-gpu}
WORK=${WORK:-/tmp/scaling_synthetic_gpu}
PYTHON=${PYTHON:-python3}
export USERS=${USERS:-200} EVENTS=${EVENTS:-1000} ITEMS=${ITEMS:-20000} TOPICS=${TOPICS:-50} SEED=${SEED:-0}
export CHUNK_USERS=${CHUNK_USERS:-0}  # > 0: the log in chunks of users, made on every CPU and prepared out of core
export LENGTHS=${LENGTHS:-"50 100 200 400"} LAYERS=${LAYERS:-"1 2 4 8"} MODELS=${MODELS:-"climber transformer hstu dlrm"}
export DEVICE=${DEVICE:-cuda} WORKERS=${WORKERS:-1} BATCH=${BATCH:-256} EPOCHS=${EPOCHS:-10} PATIENCE=${PATIENCE:-3}
export JOBS=${JOBS:-8} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OUT WORK PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
{ echo "bash benchmarks/run_scaling_gpu.sh $*"; echo "started $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true
  env | grep -E '^(USERS|EVENTS|ITEMS|TOPICS|CHUNK_USERS|SEED|LENGTHS|LAYERS|MODELS|DEVICE|WORKERS|BATCH|EPOCHS|PATIENCE|JOBS)=' | sort
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git)"; } > "$OUT/environment.txt"

[ -n "${SEED_RESULTS:-}" ] && [ ! -s "$WORK/results.jsonl" ] && cp "$SEED_RESULTS" "$WORK/results.jsonl"

stage() {  # STAGE=data|sweep|fit, SHARD=i (sweep): one step of the Python below
    STAGE=$1 SHARD=${2:-0} "$PYTHON" - <<'EOF'
import dataclasses, json, os, shutil, time
from pathlib import Path

import torch

from climber.config import Runtime, TrainConfig
from climber.data.readers import ColumnMapping
from climber.data.stream import prepare_stream
from climber.data.sumi import prepare
from climber.data.synthetic import PARQUET_COLUMNS, PREPARE, STRATEGIES, SyntheticConfig, generate, notes, write_parquet
from climber.scaling.fit import crossover_text, fit_report
from climber.scaling.planner import plan, plan_text
from climber.scaling.sweep import Grid, read_rows, sweep

env = os.environ
out, work = Path(env["OUT"]), Path(env["WORK"])
data, results = work / "data", work / "results.jsonl"
t0 = time.time()
if env["STAGE"] == "data":
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}", flush=True)
    if not (data / "meta.json").exists():  # `climber prepare synthetic --eval-requests 3 ...`
        cfg = SyntheticConfig(users=int(env["USERS"]), events_per_user=int(env["EVENTS"]), items=int(env["ITEMS"]),
                              topics=int(env["TOPICS"]), chunk_users=int(env["CHUNK_USERS"]), seed=int(env["SEED"]))
        # three requests per user for validation and three for test: steadier AUCs
        pcfg = dataclasses.replace(PREPARE, eval_requests=3)
        if cfg.chunk_users:  # `climber prepare synthetic --stream`: chunks made in parallel, prepared out of core
            parts = work / "parquet"
            shutil.rmtree(parts, ignore_errors=True)  # a killed call's chunks
            write_parquet(cfg, parts, os.cpu_count() or 1)
            meta = prepare_stream(parts, ColumnMapping(**PARQUET_COLUMNS), data, pcfg, STRATEGIES, name="synthetic",
                                  notes=notes(cfg))
            shutil.rmtree(parts)
        else:
            meta = prepare(generate(cfg), data, pcfg, STRATEGIES)
        print(f"synthetic data in {time.time() - t0:.0f}s: {json.dumps(meta['counts'])}, positive rates "
              f"{json.dumps(meta['positive_rate'])}", flush=True)
elif env["STAGE"] == "sweep":
    grid = Grid(models=tuple(env["MODELS"].split()), lengths=tuple(int(v) for v in env["LENGTHS"].split()),
                layers=tuple(int(v) for v in env["LAYERS"].split()), preset="small")
    tcfg = TrainConfig(epochs=int(env["EPOCHS"]), batch_size=int(env["BATCH"]), warmup_steps=50,
                       patience=int(env["PATIENCE"]), num_workers=int(env["WORKERS"]), log_every=50)
    shard = int(env["SHARD"])

    def log(msg: str) -> None:  # after each run, OUT gets the results so far (a call may hit its time limit)
        print(f"[shard {shard}] {msg}", flush=True)
        if results.exists():  # copied aside, then renamed: shards copying at once never tear OUT's file
            tmp = out / f".results.jsonl.{shard}"
            shutil.copy(results, tmp)
            os.replace(tmp, out / "results.jsonl")

    sweep(data, results, grid, tcfg, work / "runs", log=log, runtime=Runtime(device=env["DEVICE"]),
          shard=(shard, int(env["JOBS"])))
else:
    rows = read_rows(results)
    shutil.copy(results, out / "results.jsonl")
    s = fit_report(rows, out)
    for name, c in s["crossovers"].items():
        print(crossover_text(c, *name.split(" vs ")))
    flops = sorted(r["flops"]["exact"] for r in rows if r["model"] == "climber")
    with (out / "plans.txt").open("w") as f:
        for budget in (flops[len(flops) // 4], flops[len(flops) // 2], flops[3 * len(flops) // 4]):
            text = plan_text(plan(rows, float(f"{budget:.2g}")))
            print(text + "\n")
            f.write(text + "\n\n")
EOF
}

t0=$(date +%s)
stage data 2>&1 | tee -a "$OUT/log.txt"
for i in $(seq 0 $((JOBS - 1))); do
    stage sweep "$i" >> "$OUT/log.txt" 2>&1 &
done
wait
echo "sweep done at $(( $(date +%s) - t0 )) s" | tee -a "$OUT/log.txt"
stage fit 2>&1 | tee -a "$OUT/log.txt"
echo "done in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/log.txt"
