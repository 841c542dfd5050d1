#!/usr/bin/env bash
# "Not slower than before" on one GPU: the GPU tests of the attention, then the paper-config
# training step (benchmarks/bench_train.py, static shapes, m = 8) of this checkout and of an
# older one, alternated ROUNDS times in the same call on the same card, so that the card's
# clocks and temperature affect both alike.
#
#   git archive <old commit> climber benchmarks/bench_train.py benchmarks/common.py | tar -x -C OLD_DIR
#   benchmarks/ab_train_step.sh OLD_DIR OUT          # on the GPU machine, OLD_DIR carried there
#
# OUT/gpu_tests.txt holds the tests' output, OUT/ab.txt each run's last lines (step ms, MFU,
# peak memory). Environment: ROUNDS (default 2), LIMIT (seconds for all the timing runs,
# default 420: a round that would start later is skipped).
set -uo pipefail
OLD=$(realpath "${1:?usage: $0 OLD_DIR OUT}")
OUT=${2:?usage: $0 OLD_DIR OUT}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
ROUNDS=${ROUNDS:-2}
LIMIT=${LIMIT:-420}
(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
 python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)") | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_attention.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5
t0=$(date +%s)
for i in $(seq "$ROUNDS"); do
    for side in new old; do
        left=$(( LIMIT - ($(date +%s) - t0) ))
        [ "$left" -lt 60 ] && { echo "time's up before $side $i" | tee -a "$OUT/ab.txt"; break 2; }
        echo "=== $side, round $i" | tee -a "$OUT/ab.txt"
        dir=.; [ "$side" = old ] && dir=$OLD
        (cd "$dir" && PYTHONPATH=. timeout "$left" python3 benchmarks/bench_train.py --batch "" --paper-ms 8 \
            --out "/tmp/ab_$side$i" 2>&1 | tail -5 | tee -a "$OUT/ab.txt")
    done
done
