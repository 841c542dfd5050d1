#!/usr/bin/env bash
# A screen of model or protocol variants on one GPU, under the Table 2 protocol of
# run_compare.sh: each variant is a separate `climber compare` output with its own models and
# flags (the flags apply to every model in it), all variants training at once.
#
#   benchmarks/run_screen.sh DATA_ROOT OUT
#
# VARIANTS: one variant per line, "<folder>|<models>|<flags>"; results in
# OUT/<folder>/<data set>/compare.{md,json}. Default: the readout screen
# (benchmarks/results/table2/readout-screen/): DLRM and HSTU, Climber with each readout.
# Environment as run_compare.sh (SEEDS, LRS, EMB_MULTS, EMB_WDS, PATIENCE, DATASETS; defaults
# here: seed 0, lr 3e-3, embedding tables at 10x the rate, DATASETS="beauty lastfm"); JOBS
# (default 14) is shared among the variants in proportion to their runs; LIMIT (seconds,
# default 480) stops the training where it stands, so that what finished can be packed:
# OUT/screen.tgz holds every run's logs and results. EXTRA is appended to every call (a CPU
# smoke test: EXTRA="--max-steps 2 --device cpu").
set -uo pipefail
ROOT=${1:?usage: $0 DATA_ROOT OUT}
OUT=${2:?usage: $0 DATA_ROOT OUT}
mkdir -p "$OUT"
export SEEDS=${SEEDS:-0} LRS=${LRS:-3e-3} EMB_MULTS=${EMB_MULTS:-10} DATASETS=${DATASETS:-"beauty lastfm"}
VARIANTS=${VARIANTS:-"baselines|dlrm hstu|
plain|climber|--no-match-readout
match|climber|--match-readout
match-tp|climber|--match-readout --target-product"}
R=$(dirname "$0")/run_compare.sh
LIMIT=${LIMIT:-480}
JOBS=${JOBS:-14}
per_model=$(( $(wc -w <<< "$DATASETS") * $(wc -w <<< "$SEEDS") ))
total=0
while IFS='|' read -r _ models _; do total=$(( total + per_model * $(wc -w <<< "$models") )); done <<< "$VARIANTS"
folders=()
while IFS='|' read -r folder models flags; do
    runs=$(( per_model * $(wc -w <<< "$models") ))
    jobs=$(( (runs * JOBS + total - 1) / total ))
    MODELS=$models JOBS=$jobs EXTRA="$flags ${EXTRA:-}" timeout "$LIMIT" bash "$R" "$ROOT" "$OUT/$folder" \
        > "$OUT/$folder.log" 2>&1 &
    folders+=("$folder")
done <<< "$VARIANTS"
wait
cd "$OUT" && tar czf screen.tgz --exclude='*.safetensors' --exclude='checkpoints' --exclude='best' ./*.log "${folders[@]}"
