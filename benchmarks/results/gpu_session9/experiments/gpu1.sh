#!/usr/bin/env bash
# session 9, call 1: GPU tests of the working tree; GELU variants; static m=8 main HEAD (B) vs working tree (A: small-table lookups)
export PYTHONUNBUFFERED=1 PYTHONPATH=.
L=$OUT/log.txt
date > $L
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv >> $L
echo "=== gpu tests $(date +%T)" >> $L
timeout 220 python3 -m pytest -q -m gpu tests/ --ignore=tests/test_serve_http.py -p no:cacheprovider --tb=short > $OUT/gpu_tests.txt 2>&1
tail -6 $OUT/gpu_tests.txt >> $L
echo "=== gelu bench $(date +%T)" >> $L
timeout 120 python3 scratch/gelu_bench.py 2>&1 | grep -v "^{\|Warn\|warn" >> $L
echo "=== static m=8 B (HEAD) $(date +%T)" >> $L
PYTHONPATH=scratch/vB:. timeout 100 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/b 2>&1 | grep "^paper\|Error" >> $L
echo "=== static m=8 A (small-table lookups) $(date +%T)" >> $L
timeout 100 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/a 2>&1 | grep "^paper\|Error" >> $L
echo "=== static m=8 B again $(date +%T)" >> $L
PYTHONPATH=scratch/vB:. timeout 100 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/b2 2>&1 | grep "^paper\|Error" >> $L
date >> $L
