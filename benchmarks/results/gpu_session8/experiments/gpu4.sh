#!/usr/bin/env bash
# session 8, call 4: G (one-pass backward, bf16 dQ atomics into dqkv, compiled front, bwd tiles 32x64) = working tree
export PYTHONUNBUFFERED=1 PYTHONPATH=.
L=$OUT/log.txt
date > $L
echo "=== G gpu tests $(date +%T)" >> $L
timeout 240 python3 -m pytest -q -m gpu tests/ -p no:logging -p no:cacheprovider --tb=short > $OUT/gpu_tests.txt 2>&1
tail -4 $OUT/gpu_tests.txt >> $L
echo "=== static m=8 F bwd=32,64,4,2 $(date +%T)" >> $L
PYTHONPATH=scratch/vF:. timeout 90 python3 scratch/tiles_bench.py bwd 32,64,4,2 -- --batch "" --paper-ms 8 --out /tmp/f 2>&1 | grep "^paper\|Error" >> $L
echo "=== static m=8 G $(date +%T)" >> $L
timeout 90 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/g 2>&1 | grep "^paper\|Error" >> $L
echo "=== headline bench_train --profile $(date +%T)" >> $L
timeout 200 python3 benchmarks/bench_train.py --profile --out $OUT 2>&1 | grep -v "Warning\|warnings.warn\|_warn_once" > $OUT/bench_train.txt
grep -A14 "^size" $OUT/bench_train.txt >> $L
head -8 $OUT/bench_train_profile.txt >> $L
echo "=== bench_attention $(date +%T)" >> $L
timeout 120 python3 benchmarks/bench_attention.py --shapes 512x8x208x64,64x8x800x64 --variants flash,fused-kernel --out $OUT 2>&1 | grep -v "^{\|Warning\|_warn_once" > $OUT/bench_attention.txt
grep -A30 "^variant" $OUT/bench_attention.txt >> $L
date >> $L
