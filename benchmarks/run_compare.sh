#!/usr/bin/env bash
# Table 2 (docs/paper.md section 4) on the five public data sets, on one GPU: Climber, its two
# ablations (MSE only; without BGF) and the DLRM, DIN, TWIN, Transformer and HSTU baselines,
# 3 seeds each, through `climber compare` (climber/compare.py).
#
#   benchmarks/run_compare.sh DATA_ROOT [OUT]     (default OUT: benchmarks/results/table2)
#
# DATA_ROOT holds the prepared data dirs ml-100k kuairand lastfm beauty grocery (`climber
# prepare <name> --out DATA_ROOT/<name>`); results go to OUT/<dataset>/compare.{md,json} and the
# training logs to OUT/<dataset>/log_<model>.txt. The committed records are benchmarks/results/table2/
# (this script's defaults) and benchmarks/results/table2/embedding-lr-10x/ (EXTRA="--embedding-lr-mult 10",
# see that folder's README).
#
# Budget, the same for every model of a data set (preset small: 4 blocks x 50 events, d 64,
# 2 heads, 2 layers; lr 1e-3, warm-up 50 steps then cosine, validation once per epoch, early
# stopping after 3 validations without gain, best validation checkpoint tested). Tuning: the
# learning rate, from the grid LRS (default {1e-3, 3e-3}) shared by every model, picked per
# model by mean validation AUC over the seeds; test is evaluated only at the picked rate
# (compare.md states it). Per data set, from its training
# requests (batch = requests, each with its history once and all its candidates):
#
#   data set   train req.  batch  epochs  steps/run
#   ml-100k       14,822    256      8       464
#   kuairand      28,743    256      4       452
#   lastfm        50,371    512      5       495
#   beauty       153,776   1024      3       453
#   grocery       69,176    512      3       408
#
# i.e. ~450 steps per run, 48 runs per data set (8 models x 2 rates x 3 seeds), ~110k steps in all.
# The models are small, so one process cannot keep the GPU busy: (model, data set) jobs run
# JOBS at a time (default 8; 16 CPU cores = 8 x (trainer + one loader worker)), slowest first.
# Time, estimated from H200 measurements (one process alone: Climber 26-37 steps/s, its
# ablations 35-39, the baselines 44-75; 8 processes at once at batch 1024: the Climber
# variants ~10 steps/s each, the baselines 40-80): about 7 minutes (6-8), the Climber
# variants being most of it, per learning rate. Measured: 1,266 s for all 240 runs with JOBS=6
# on one H200. A last `climber
# compare` per data set, with all models, finds every run finished and only writes the table;
# it is the command recorded in compare.md (run alone, it would train the same runs one after
# another). Rerunning this script skips finished runs and resumes interrupted ones.
#
# Environment: JOBS (default 8); GPUS (default 1): jobs are spread over that many GPUs by their
# xargs slot (slot mod GPUS); LRS (default "1e-3 3e-3"); DATASETS (default all five); MODELS
# (default all eight Table 2 rows; e.g. add climber-tp, the target-product readout); EXTRA,
# flags appended to every call, e.g. `--embedding-lr-mult 10`, or a CPU smoke test of the
# script: DATASETS=ml-100k EXTRA="--seeds 0 --max-steps 2 --device cpu".
set -euo pipefail

ROOT=$(realpath "${1:?usage: $0 DATA_ROOT [OUT]}")
OUT=${2:-$(dirname "$0")/results/table2}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
cd "$(dirname "$0")/.."  # the repository root: `python -m climber` runs from the checkout
JOBS=${JOBS:-8}
GPUS=${GPUS:-1}
LRS=${LRS:-"1e-3 3e-3"}
PY=${PYTHON:-python3}
EXTRA=${EXTRA:-}
read -r -a MODELS <<< "${MODELS:-climber climber-nobgf climber-mse hstu transformer din twin dlrm}"  # slowest first
read -r -a DATASETS <<< "${DATASETS:-beauty grocery lastfm kuairand ml-100k}"  # largest first
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

budget() {  # data set -> its flags
    case $1 in
        ml-100k) echo "--batch-size 256 --epochs 8" ;;
        kuairand) echo "--batch-size 256 --epochs 4" ;;
        lastfm) echo "--batch-size 512 --epochs 5" ;;
        beauty) echo "--batch-size 1024 --epochs 3" ;;
        grocery) echo "--batch-size 512 --epochs 3" ;;
        *) echo "unknown data set $1" >&2; exit 2 ;;
    esac
}

compare() {  # data set, then models; every other flag is the same for all calls on a data set
    local ds=$1; shift
    # cuda:0, not cuda: train.py's torch.cuda.set_device needs an index outside torchrun
    # shellcheck disable=SC2046,SC2086  # the budget and EXTRA are lists of flags
    $PY -m climber compare --data "$ROOT/$ds" --out "$OUT/$ds" --models "$@" --seeds 0 1 2 --preset small \
        --lrs $LRS --warmup-steps 50 --patience 3 --device "${DEVICE:-cuda:0}" --num-workers 1 --log-every 50 \
        $(budget "$ds") $EXTRA
}
export -f compare budget
export ROOT OUT PY EXTRA LRS GPUS

for ds in "${DATASETS[@]}"; do
    [ -f "$ROOT/$ds/meta.json" ] || { echo "missing prepared data $ROOT/$ds" >&2; exit 2; }
    mkdir -p "$OUT/$ds"
done

t0=$(date +%s)
# one job per (model, data set), longest first; each trains its model's seeds one after another
for m in "${MODELS[@]}"; do for ds in "${DATASETS[@]}"; do echo "$ds $m"; done; done |
    xargs -P "$JOBS" -L 1 --process-slot-var=SLOT bash -c 'DEVICE=cuda:$((SLOT % GPUS)) \
        compare "$0" "$1" > "$OUT/$0/log_$1.txt" 2>&1 || {
        echo "FAILED: $0 $1, see $OUT/$0/log_$1.txt" >&2; exit 255; }'
echo "all runs finished in $(( $(date +%s) - t0 )) s"
for ds in "${DATASETS[@]}"; do  # every run is done: these calls only write the tables
    compare "$ds" "${MODELS[@]}" | grep -v '^\[compare\]'
    echo
done
