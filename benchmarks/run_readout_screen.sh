#!/usr/bin/env bash
# Readout screen on the data sets where Climber trailed DLRM (LastFM, Beauty), one GPU, under
# the Table 2 protocol of run_compare.sh: DLRM, HSTU and three Climber readouts side by side,
# each variant a separate `climber compare` output (its flags apply to every model in it).
#
#   benchmarks/run_readout_screen.sh DATA_ROOT OUT
#
# OUT/plain (climber --no-match-readout, hstu, dlrm), OUT/match (climber --match-readout), OUT/match-tp (climber
# --match-readout --target-product); each OUT/<variant>/<data set>/compare.{md,json}. Environment
# as run_compare.sh (SEEDS, LRS, EMB_MULTS, EMB_WDS, PATIENCE, DATASETS; default here: seed 0,
# lr 3e-3, embedding rate x10, the point every model picked in the earlier 10x rerun, and
# DATASETS="beauty lastfm"); LIMIT (seconds, default 480) stops the training where it stands,
# so that what finished can be packed: OUT/screen.tgz holds every run's logs and results. EXTRA
# is appended to every call (a CPU smoke test: EXTRA="--max-steps 2 --device cpu").
set -uo pipefail
ROOT=${1:?usage: $0 DATA_ROOT OUT}
OUT=${2:?usage: $0 DATA_ROOT OUT}
mkdir -p "$OUT"
export SEEDS=${SEEDS:-0} LRS=${LRS:-3e-3} EMB_MULTS=${EMB_MULTS:-10} DATASETS=${DATASETS:-"beauty lastfm"}
R=$(dirname "$0")/run_compare.sh
LIMIT=${LIMIT:-480}
n=$(wc -w <<< "$DATASETS")
X=${EXTRA:-}
MODELS="climber hstu dlrm" JOBS=$((3 * n)) EXTRA="--no-match-readout $X" timeout "$LIMIT" bash "$R" "$ROOT" "$OUT/plain" > "$OUT/plain.log" 2>&1 &
MODELS=climber JOBS=$n EXTRA="--match-readout $X" timeout "$LIMIT" bash "$R" "$ROOT" "$OUT/match" > "$OUT/match.log" 2>&1 &
MODELS=climber JOBS=$n EXTRA="--match-readout --target-product $X" timeout "$LIMIT" \
    bash "$R" "$ROOT" "$OUT/match-tp" > "$OUT/match-tp.log" 2>&1 &
wait
cd "$OUT" && tar czf screen.tgz --exclude='*.safetensors' --exclude='checkpoints' --exclude='best' ./*.log plain match match-tp
