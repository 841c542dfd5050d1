#!/usr/bin/env bash
# Scenario adaptation, measured (issue 24; docs/design.md, scenarios), on one GPU: on a
# multi-domain set (Beauty + Grocery + LastFM, each source a request scenario) and on a SYNTHETIC
# set whose scenarios read the history differently (`--scenario-recency 3`: search depends on the
# last few events, the daily mix on long-term taste), `climber compare` with the rows
#   climber             one model, per-scenario temperature and bias (the ATL's scenario axis)
#   climber-shared-tau  the same with that axis collapsed (one temperature and bias for all)
#   climber-per-domain  one Climber per scenario, each trained on its scenario's requests
#   hstu, dlrm          baselines, the request scenario a feature of the candidates
# 3 seeds each, then the learned temperatures of every climber and climber-shared-tau seed
# (benchmarks/plot_temperatures.py).
#
#   benchmarks/run_scenarios.sh DATA_ROOT [OUT]     (default OUT: benchmarks/results/scenarios)
#
# DATA_ROOT/beauty+grocery+lastfm and DATA_ROOT/synthetic-recency3 are prepared here unless they
# hold a meta.json (`climber prepare beauty+grocery+lastfm` reads the shared data folder:
# CLIMBER_SHARED_DATA, default ../shared/data). Results: OUT/<data set>/compare.{md,json}, the
# logs OUT/<data set>/log_<model>_seed<seed>.txt, the temperatures
# OUT/<data set>/temperatures/<model>/seed<seed>/temperatures.{json,png}; the runs in
# OUT/<data set>/runs/ (ignored by git).
#
# Protocol: that of benchmarks/run_compare.sh (read it): preset small, warm-up 50 steps then
# cosine decay over an epoch cap no model reaches, validation twice per epoch, early stopping
# after PATIENCE validations without gain, the best validation checkpoint tested; one grid point
# per row picked by mean validation AUC over the seeds (default grid lr {1e-3, 3e-3} x embedding
# rate multiplier {1}: two points, half of Table 2's, to fit the device time). Budgets:
#
#   data set               batch  epoch cap   notes
#   beauty+grocery+lastfm   1024     20       ~270k training requests (Table 2's three, summed)
#   synthetic-recency3       512     20       USERS=2000 x EVENTS=150 median events, 3 eval requests
#                                             per user (sized for a few minutes per run on an H100)
#
# (model, data set, seed) jobs run JOBS at a time (default 8), slowest first; climber-per-domain
# is one job that trains its scenarios' models one after another. Every call skips finished runs
# and resumes interrupted ones, so a time-limited machine can run it in several calls (each
# killed one loses minutes: checkpoints every 5). A last `climber compare` per data set writes the
# table. Environment: JOBS, GPUS, SEEDS (default "0 1 2"), LRS, EMB_MULTS, NEGS (the grid; default
# one point, Table 2's: lr 3e-3, embedding rate x10, 16 training negatives), PATIENCE (default 4),
# DATASETS (default both), MODELS, USERS, EVENTS, PYTHON, EXTRA (flags appended to every compare
# call). CPU smoke test of the script (tiny sizes, two steps a run):
#   USERS=60 EVENTS=60 SEEDS=0 JOBS=2 PYTHON=.venv/bin/python EXTRA="--max-steps 2 --device cpu --preset tiny" \
#       bash benchmarks/run_scenarios.sh /tmp/scen_data /tmp/scen_out
set -euo pipefail

ROOT=${1:?usage: $0 DATA_ROOT [OUT]}
OUT=${2:-$(dirname "$0")/results/scenarios}
mkdir -p "$ROOT" "$OUT"
ROOT=$(realpath "$ROOT")
OUT=$(realpath "$OUT")
cd "$(dirname "$0")/.."  # the repository root: `python -m climber` runs from the checkout
JOBS=${JOBS:-8}
GPUS=${GPUS:-1}
SEEDS=${SEEDS:-"0 1 2"}
LRS=${LRS:-"3e-3"}
EMB_MULTS=${EMB_MULTS:-"10"}
NEGS=${NEGS:-"16"}
PATIENCE=${PATIENCE:-4}
USERS=${USERS:-2000}
EVENTS=${EVENTS:-150}
PY=${PYTHON:-python3}
EXTRA=${EXTRA:-}
MULTI=beauty+grocery+lastfm
SYNTH=synthetic-recency3
read -r -a MODELS <<< "${MODELS:-climber-per-domain climber climber-shared-tau hstu dlrm}"  # slowest first
read -r -a DATASETS <<< "${DATASETS:-$MULTI $SYNTH}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

budget() {  # data set -> its flags
    case $1 in
        "$MULTI") echo "--batch-size 1024 --epochs 20" ;;
        "$SYNTH") echo "--batch-size 512 --epochs 20" ;;
        *) echo "unknown data set $1" >&2; exit 2 ;;
    esac
}

compare() {  # data set, then models; every other flag is the same for all calls on a data set
    local ds=$1; shift
    # shellcheck disable=SC2046,SC2086  # the budget and EXTRA are lists of flags
    $PY -m climber compare --data "$ROOT/$ds" --out "$OUT/$ds" --models "$@" --seeds ${RUN_SEEDS:-$SEEDS} --preset small \
        --lrs $LRS --embedding-lr-mults $EMB_MULTS --train-negative-counts $NEGS --warmup-steps 50 --patience "$PATIENCE" --device "${DEVICE:-cuda:0}" \
        --num-workers 1 --log-every 50 $(budget "$ds") $EXTRA
}
export -f compare budget
export ROOT OUT PY EXTRA SEEDS LRS EMB_MULTS NEGS PATIENCE GPUS MULTI SYNTH

for ds in "${DATASETS[@]}"; do  # prepare what is missing
    [ -f "$ROOT/$ds/meta.json" ] && continue
    case $ds in
        "$MULTI") $PY -m climber prepare "$MULTI" --out "$ROOT/$MULTI" ;;
        "$SYNTH") $PY -m climber prepare synthetic --out "$ROOT/$SYNTH" --users "$USERS" --events-per-user "$EVENTS" \
                      --scenario-recency 3 --eval-requests 3 --seed 0 ;;
        *) echo "unknown data set $ds" >&2; exit 2 ;;
    esac
done
for ds in "${DATASETS[@]}"; do mkdir -p "$OUT/$ds"; done

t0=$(date +%s)
# one job per (model, data set, seed), training only (--train-only); the test split is evaluated
# below, once, at the grid point each row picks over all seeds
for m in "${MODELS[@]}"; do for ds in "${DATASETS[@]}"; do for s in $SEEDS; do echo "$ds $m $s"; done; done; done |
    xargs -P "$JOBS" -L 1 --process-slot-var=SLOT bash -c 'RUN_SEEDS=$2 DEVICE=cuda:$((SLOT % GPUS)) \
        compare "$0" "$1" --train-only > "$OUT/$0/log_$1_seed$2.txt" 2>&1 || {
        echo "FAILED: $0 $1 seed $2, see $OUT/$0/log_$1_seed$2.txt" >&2; exit 255; }'
echo "all runs finished in $(( $(date +%s) - t0 )) s"
for ds in "${DATASETS[@]}"; do  # every run is done: these calls only test the picked runs and write the tables
    compare "$ds" "${MODELS[@]}" | grep -v '^\[compare\]'
    echo
    # the learned temperatures of each seed of the picked point (benchmarks/plot_temperatures.py)
    $PY - "$OUT/$ds" <<'EOF'
import json, subprocess, sys
from pathlib import Path

from climber.compare import point_tag

out = Path(sys.argv[1])
for row in json.loads((out / "compare.json").read_text())["rows"]:
    if row["model"] not in ("climber", "climber-shared-tau"):
        continue
    for s in row["seeds"]:
        ckpt = out / "runs" / row["model"] / point_tag(row["picked"]) / f"seed{s}" / "best"
        dest = out / "temperatures" / row["model"] / f"seed{s}"
        subprocess.run([sys.executable, "-m", "benchmarks.plot_temperatures", "--checkpoint", str(ckpt),
                        "--out", str(dest)], check=True, stdout=subprocess.DEVNULL)
        print(f"temperatures of {row['model']} seed {s}: {dest}")
EOF
done
