#!/usr/bin/env bash
# Scenario adaptation, measured (docs/scenarios.md), on one GPU: on a
# multi-domain set (Beauty + Grocery + LastFM, each source a request scenario) and on two SYNTHETIC
# sets whose scenarios read the history differently (`--scenario-recency 3`: search's likes depend
# on the last few events, the daily mix's on long-term taste; `synthetic-contrast3` adds
# `--scenario-contrast 3`: search clicks again on the topics just liked, the daily mix avoids them,
# which bounds what adaptation can gain at 0.008 AUC instead of 0.0006, benchmarks/scenario_truth.py),
# `climber compare` with the rows
#   climber             one model, per-scenario temperature and bias (the ATL's scenario axis)
#   climber-shared-tau  the same with that axis collapsed (one temperature and bias for all)
#   climber-per-domain  one Climber per scenario, each trained on its scenario's requests
#   hstu, dlrm          baselines, the request scenario a feature of the candidates
# 3 seeds each, then the learned temperatures of every climber and climber-shared-tau seed
# (benchmarks/plot_temperatures.py).
#
#   benchmarks/run_scenarios.sh DATA_ROOT [OUT]     (default OUT: benchmarks/results/scenarios)
#
# DATA_ROOT/beauty+grocery+lastfm and DATA_ROOT/synthetic-{recency3,contrast3} are prepared here unless they
# hold a meta.json (`climber prepare beauty+grocery+lastfm` reads the shared data folder:
# CLIMBER_SHARED_DATA, default ../shared/data). Results: OUT/<data set>/compare.{md,json}, the
# logs OUT/<data set>/log_<model>_seed<seed>.txt, the temperatures
# OUT/<data set>/temperatures/<model>/seed<seed>/temperatures.{json,png}; the runs in
# OUT/<data set>/runs/ (ignored by git).
#
# Protocol: that of benchmarks/run_compare.sh (read it): preset small, warm-up 50 steps then
# cosine decay over an epoch cap no model reaches, validation twice per epoch, early stopping
# after PATIENCE validations without gain, the best validation checkpoint tested; one grid point
# per row picked by mean validation AUC over the seeds. Budgets (in run_compare.sh's table):
#
#   data set               batch  epoch cap   notes
#   beauty+grocery+lastfm   2048     20       ~270k training requests (Table 2's three, summed): 133 steps
#                                             an epoch, as Table 2's sets have 99-151. JOBS=16 ran out of
#                                             an H200's 140 GB (one run held 49 GB) and reached step 134-201
#                                             of ~500 in 8 minutes: run it with JOBS=6 and plan about 25
#                                             minutes of GPU time for the 21 jobs
#   synthetic-recency3       512     20       USERS=2000 x EVENTS=150 median events, 3 eval requests
#                                             per user (sized for a few minutes per run on an H100)
#   synthetic-contrast3      512     20       the same sizes
#
# The training is benchmarks/run_compare.sh's: (model, data set, seed) jobs JOBS at a time,
# climber-per-domain one job per scenario (`climber compare --domain K`); every call skips
# finished runs and resumes interrupted ones, so a time-limited machine can run it in several
# calls. Environment: run_compare.sh's (JOBS, GPUS, SEEDS, PATIENCE, PYTHON, EXTRA; the grid LRS,
# EMB_MULTS, NEGS defaults here to Table 2's one point: lr 3e-3, embedding rate x10, 16 training
# negatives), DATASETS (default both), MODELS, USERS, EVENTS. CPU smoke test of the script (tiny sizes, two steps a run):
#   USERS=60 EVENTS=60 SEEDS=0 JOBS=2 PYTHON=.venv/bin/python EXTRA="--max-steps 2 --device cpu --preset tiny" \
#       bash benchmarks/run_scenarios.sh /tmp/scen_data /tmp/scen_out
set -euo pipefail

ROOT=${1:?usage: $0 DATA_ROOT [OUT]}
OUT=${2:-$(dirname "$0")/results/scenarios}
mkdir -p "$ROOT" "$OUT"
ROOT=$(realpath "$ROOT")
OUT=$(realpath "$OUT")
cd "$(dirname "$0")/.."  # the repository root: `python -m climber` runs from the checkout
export LRS=${LRS:-"3e-3"} EMB_MULTS=${EMB_MULTS:-"10"} NEGS=${NEGS:-"16"}
export MODELS=${MODELS:-"climber-per-domain climber climber-shared-tau hstu dlrm"}  # slowest first
MULTI=beauty+grocery+lastfm
SYNTH=synthetic-recency3
CONTRAST=synthetic-contrast3
export DATASETS=${DATASETS:-"$MULTI $SYNTH $CONTRAST"}
PY=${PYTHON:-python3}

for ds in $DATASETS; do  # prepare what is missing
    [ -f "$ROOT/$ds/meta.json" ] && continue
    case $ds in
        "$MULTI") $PY -m climber prepare "$MULTI" --out "$ROOT/$MULTI" ;;
        "$SYNTH") $PY -m climber prepare synthetic --out "$ROOT/$SYNTH" --users "${USERS:-2000}" \
                      --events-per-user "${EVENTS:-150}" --scenario-recency 3 --eval-requests 3 --seed 0 ;;
        "$CONTRAST") $PY -m climber prepare synthetic --out "$ROOT/$CONTRAST" --users "${USERS:-2000}" \
                      --events-per-user "${EVENTS:-150}" --scenario-recency 3 --scenario-contrast 3 \
                      --eval-requests 3 --seed 0 ;;
        *) echo "unknown data set $ds" >&2; exit 2 ;;
    esac
done
bash benchmarks/run_compare.sh "$ROOT" "$OUT"
for ds in $DATASETS; do
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
