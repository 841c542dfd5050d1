#!/usr/bin/env bash
# session 8, call 5: H = G + shifted forward tiles (working tree); G = scratch/vG
export PYTHONUNBUFFERED=1 PYTHONPATH=.
L=$OUT/log.txt
date > $L
echo "=== H gpu tests $(date +%T)" >> $L
timeout 240 python3 -m pytest -q -m gpu tests/ --ignore=tests/test_serve_http.py -p no:logging -p no:cacheprovider --tb=short > $OUT/gpu_tests.txt 2>&1
tail -4 $OUT/gpu_tests.txt >> $L
echo "=== static m=8 G $(date +%T)" >> $L
PYTHONPATH=scratch/vG:. timeout 90 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/g 2>&1 | grep "^paper\|Error" >> $L
echo "=== static m=8 H $(date +%T)" >> $L
timeout 90 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/h 2>&1 | grep "^paper\|Error" >> $L
echo "=== sweep H $(date +%T)" >> $L
timeout 100 python3 benchmarks/bench_attention.py --sweep --shapes 512x8x208x64 --reps 10 --out /tmp/sw 2>&1 | grep -A13 "tiles" >> $L
echo "=== headline bench_train --profile $(date +%T)" >> $L
timeout 200 python3 benchmarks/bench_train.py --profile --out $OUT 2>&1 | grep -v "Warning\|warnings.warn\|_warn_once" > $OUT/bench_train.txt
grep -A14 "^size" $OUT/bench_train.txt >> $L
head -8 $OUT/bench_train_profile.txt >> $L
echo "=== bench_attention $(date +%T)" >> $L
timeout 120 python3 benchmarks/bench_attention.py --shapes 512x8x208x64,64x8x800x64 --variants flash,fused-kernel --out $OUT 2>&1 | grep -v "^{\|Warning\|_warn_once" > $OUT/bench_attention.txt
grep -A30 "^variant" $OUT/bench_attention.txt >> $L
date >> $L
