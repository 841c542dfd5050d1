#!/usr/bin/env bash
# Throughput of the comparison's small runs sharing one GPU: J concurrent `climber train`
# processes (the way benchmarks/run_compare.sh packs Table 2), eager and with --compile, on
# one prepared data set. Prints, per mode, the steady aggregate rate (steps/s summed over the
# processes, between step WARM and the last logged step, from each run's train_log.csv) and
# the wall time to the first logged step after WARM (compile cost included).
#
#   benchmarks/bench_concurrent_train.sh DATA_DIR OUT
#
# Environment: J (default 8), STEPS (default 300), WARM (default 100), MODES (default
# "eager compile"), MODEL_FLAGS (default "--arch climber"), BATCH (default 1024), NEG (default
# 16, implicit data only).
set -euo pipefail
DATA=${1:?usage: $0 DATA_DIR OUT}
OUT=${2:?usage: $0 DATA_DIR OUT}
J=${J:-8}; STEPS=${STEPS:-300}; WARM=${WARM:-100}; MODES=${MODES:-"eager compile"}
BATCH=${BATCH:-1024}; NEG=${NEG:-16}; MODEL_FLAGS=${MODEL_FLAGS:-"--arch climber"}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
for mode in $MODES; do
    flag=--no-compile; [ "$mode" = compile ] && flag=--compile
    mkdir -p "$OUT/$mode"
    t0=$(date +%s.%N)
    for j in $(seq 0 $((J - 1))); do
        # shellcheck disable=SC2086  # MODEL_FLAGS is a list of flags
        $PY -m climber train --data "$DATA" --out "$OUT/$mode/run$j" --preset small $MODEL_FLAGS $flag \
            --batch-size "$BATCH" --train-negatives "$NEG" --lr 3e-3 --embedding-lr-mult 10 --seed "$j" \
            --max-steps "$STEPS" --log-every 25 --eval-every 100000 --checkpoint-every 100000 \
            --num-workers 1 --device cuda:0 > "$OUT/$mode/log$j.txt" 2>&1 &
    done
    wait
    t1=$(date +%s.%N)
    $PY - "$OUT/$mode" "$J" "$WARM" "$t0" "$t1" "$mode" <<'PY'
import csv, sys
from pathlib import Path
root, J, warm, t0, t1, mode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
rates = []
for j in range(J):
    rows = [r for r in csv.DictReader(open(root / f"run{j}" / "train_log.csv")) if r["split"] == "train"]
    a = next(r for r in rows if int(r["step"]) >= warm)
    b = rows[-1]
    rates.append((int(b["step"]) - int(a["step"])) / (float(b["elapsed_s"]) - float(a["elapsed_s"])))
print(f"{mode}: J={J} aggregate {sum(rates):.1f} steps/s (per process {min(rates):.2f}-{max(rates):.2f}), "
      f"wall {t1 - t0:.0f} s for {J} x {rows[-1]['step']} steps")
PY
done
