#!/usr/bin/env bash
# Table 2 (docs/paper.md section 4) on the five public data sets, on one GPU: Climber, its two
# ablations (MSE only; without BGF) and the DLRM, DIN, TWIN, Transformer and HSTU baselines,
# 3 seeds each, through `climber compare` (climber/compare.py).
#
#   benchmarks/run_compare.sh DATA_ROOT [OUT]     (default OUT: benchmarks/results/table2)
#
# DATA_ROOT holds the prepared data dirs ml-100k kuairand lastfm beauty grocery (`climber
# prepare <name> --out DATA_ROOT/<name>`); results go to OUT/<dataset>/compare.{md,json} and the
# training logs to OUT/<dataset>/log_<model>_seed<seed>.txt (appended to: a rerun that skips
# finished runs keeps their logs). The committed record is
# benchmarks/results/table2/ (its README has the exact commands).
#
# Protocol, the same for every model of a data set (climber/compare.py): preset small (4 blocks
# x 50 events, d 64, 2 heads, 2 layers); warm-up 50 steps then cosine decay over an epoch cap
# that no model reaches; validation twice per epoch, early stopping after PATIENCE validations
# without gain (default 4, two epochs), the best validation checkpoint tested; on implicit data
# sets training negatives per positive drawn afresh every epoch (validation and test keep the
# prepared ones). Tuning: one point per model from the grid LRS x EMB_MULTS x EMB_WDS x NEGS
# (training negatives; defaults {1e-3, 3e-3} x {1, 10} x {0} x {16}: 16 instead of 4 raised every
# model's validation AUC in table2/pooled-screen), shared by every model, picked by mean validation AUC over the
# seeds; the test split is evaluated only at the picked point (compare.md states it). Batch
# (requests, each with its history once and all its candidates) and epoch cap per data set:
#
#   data set   train req.  batch  epoch cap  steps/epoch
#   ml-100k       14,822    256      30          58
#   kuairand      28,743    256      20         113
#   lastfm        50,371    512      30          99
#   beauty       153,776   1024      20         151
#   grocery       69,176    512      20         136
#
# The models are small, so one process cannot keep the GPU busy: (model, data set, seed) jobs
# run JOBS at a time (default 8; 16 CPU cores = 8 x (trainer + one loader worker)), slowest first.
# With one grid point each job also tests its run (the point every model picks is known before
# training), so runs finished before a time limit keep their test metrics; with several, jobs only
# train and the test split is evaluated once, for the picked point. A last `climber compare` per
# data set, with all models, finds every run finished and only writes the table; it is the command recorded in compare.md (run alone, it would train the
# same runs one after another). Rerunning this script skips finished runs and resumes
# interrupted ones.
#
# A job that fails (say, out of GPU memory beside the others) is retried once after the rest,
# RETRY_JOBS (default 2) at a time, from its last checkpoint; one that fails twice stops the script.
#
# Environment: JOBS (default 8); GPUS (default 1): jobs are spread over that many GPUs by their
# xargs slot (slot mod GPUS), unless DEVICE names one device for all (e.g. cpu); SEEDS (default
# "0 1 2"); LRS, EMB_MULTS, EMB_WDS, NEGS (the grid); PATIENCE; DATASETS (default all five);
# MODELS (default all nine Table 2 rows); EXTRA, flags appended to every call. A CPU smoke test:
# DATASETS=ml-100k SEEDS=0 MODELS="dlrm din" DEVICE=cpu EXTRA="--max-steps 2" benchmarks/run_compare.sh .gpudata /tmp/smoke
set -euo pipefail

ROOT=$(realpath "${1:?usage: $0 DATA_ROOT [OUT]}")
OUT=${2:-$(dirname "$0")/results/table2}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
cd "$(dirname "$0")/.."  # the repository root: `python -m climber` runs from the checkout
JOBS=${JOBS:-8}
GPUS=${GPUS:-1}
SEEDS=${SEEDS:-"0 1 2"}
LRS=${LRS:-"1e-3 3e-3"}
EMB_MULTS=${EMB_MULTS:-"1 10"}
EMB_WDS=${EMB_WDS:-"0"}
NEGS=${NEGS:-"16"}
PATIENCE=${PATIENCE:-4}
PY=${PYTHON:-python3}
EXTRA=${EXTRA:-}
read -r -a MODELS <<< "${MODELS:-climber-large climber climber-nobgf climber-mse hstu transformer din twin dlrm}"  # slowest first
read -r -a DATASETS <<< "${DATASETS:-beauty grocery lastfm kuairand ml-100k}"  # largest first
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
# 15 jobs on one H100 ran out of GPU memory (single jobs' cached blocks reached 17-25 GB); with
# expandable segments 14-15 jobs a call ran without it
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

budget() {  # data set -> its flags
    case $1 in
        ml-100k) echo "--batch-size 256 --epochs 30" ;;
        kuairand) echo "--batch-size 256 --epochs 20" ;;
        lastfm) echo "--batch-size 512 --epochs 30" ;;
        beauty) echo "--batch-size 1024 --epochs 20" ;;
        grocery) echo "--batch-size 512 --epochs 20" ;;
        beauty+grocery+lastfm) echo "--batch-size 2048 --epochs 20" ;;  # benchmarks/run_scenarios.sh
        synthetic-*) echo "--batch-size 512 --epochs 20" ;;  # benchmarks/run_scenarios.sh
        *) echo "unknown data set $1" >&2; exit 2 ;;
    esac
}

compare() {  # data set, then models; every other flag is the same for all calls on a data set
    local ds=$1; shift
    # cuda:0, not cuda: train.py's torch.cuda.set_device needs an index outside torchrun
    # shellcheck disable=SC2046,SC2086  # the budget and EXTRA are lists of flags
    $PY -m climber compare --data "$ROOT/$ds" --out "$OUT/$ds" --models "$@" --seeds ${RUN_SEEDS:-$SEEDS} --preset small \
        --lrs $LRS --embedding-lr-mults $EMB_MULTS --embedding-weight-decays $EMB_WDS --train-negative-counts $NEGS --warmup-steps 50 \
        --patience "$PATIENCE" --device "${DEVICE:-cuda:0}" --num-workers 1 --log-every 50 $(budget "$ds") $EXTRA
}
export -f compare budget
export ROOT OUT PY EXTRA SEEDS LRS EMB_MULTS EMB_WDS NEGS PATIENCE GPUS DEVICE

for ds in "${DATASETS[@]}"; do
    [ -f "$ROOT/$ds/meta.json" ] || { echo "missing prepared data $ROOT/$ds" >&2; exit 2; }
    budget "$ds" > /dev/null  # an unknown data set stops here (inside compare's $(...) it would not)
    mkdir -p "$OUT/$ds"
done

t0=$(date +%s)
# one job per (model, data set, seed), longest first; with several grid points jobs only train
# (--train-only), so the test split is evaluated below, once, for the point each model picks
read -r -a GRID <<< "$LRS $EMB_MULTS $EMB_WDS $NEGS"
ONLY=""; [ "${#GRID[@]}" -gt 4 ] && ONLY="--train-only"
export ONLY
# climber-per-domain: one job per request scenario (`--domain`), so that a row's domain models train side by side
domains() {  # data set -> its request scenarios
    $PY -c "import numpy as np, sys; print(*np.unique(np.load(sys.argv[1] + '/req_scenario.npy')))" "$ROOT/$1"
}
# a failed job (e.g. out of GPU memory beside the others) is listed in $FAILED and retried once
# after the rest, RETRY_JOBS at a time (default 2), resuming from its last checkpoint
FAILED=$(mktemp)
export FAILED
job='RUN_SEEDS=$2 DEVICE=${DEVICE:-cuda:$((SLOT % GPUS))}
    if [ "$3" = - ]; then log=$OUT/$0/log_$1_seed$2.txt; part=""; else log=$OUT/$0/log_$1_seed$2_domain$3.txt; part="--domain $3"; fi
    compare "$0" "$1" $ONLY $part >> "$log" 2>&1 || { echo "failed: $0 $1 seed $2 $part, see $log" >&2; echo "$0 $1 $2 $3" >> "$FAILED"; }'
for m in "${MODELS[@]}"; do for ds in "${DATASETS[@]}"; do for s in $SEEDS; do
    if [ "$m" = climber-per-domain ]; then for k in $(domains "$ds"); do echo "$ds $m $s $k"; done
    else echo "$ds $m $s -"; fi
done; done; done | xargs -P "$JOBS" -L 1 --process-slot-var=SLOT bash -c "$job"
if [ -s "$FAILED" ]; then
    echo "retrying $(wc -l < "$FAILED") failed job(s), ${RETRY_JOBS:-2} at a time" >&2
    mv "$FAILED" "$FAILED.first"
    xargs -P "${RETRY_JOBS:-2}" -L 1 --process-slot-var=SLOT bash -c "$job" < "$FAILED.first"
    rm -f "$FAILED.first"
    [ -s "$FAILED" ] && { echo "FAILED twice:" >&2; cat "$FAILED" >&2; rm -f "$FAILED"; exit 1; }
fi
rm -f "$FAILED"
echo "all runs finished in $(( $(date +%s) - t0 )) s"
for ds in "${DATASETS[@]}"; do  # every run is done: these calls only write the tables
    compare "$ds" "${MODELS[@]}" | grep -v '^\[compare\]'
    echo
done
