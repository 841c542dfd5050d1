#!/usr/bin/env bash
# session 9, call 3: E (working tree: lookups + sigmoid GELU + 1/tau in front + compiled readout) vs D (GELU only); GPU tests; headline
export PYTHONUNBUFFERED=1 PYTHONPATH=.
L=$OUT/log.txt
date > $L
echo "=== static m=8 E $(date +%T)" >> $L
timeout 100 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/e 2>&1 | grep "^paper\|Error" >> $L
echo "=== static m=8 D (GELU only) $(date +%T)" >> $L
PYTHONPATH=scratch/vD:. timeout 100 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/d 2>&1 | grep "^paper\|Error" >> $L
echo "=== gpu tests $(date +%T)" >> $L
timeout 200 python3 -m pytest -q -m gpu tests/ --ignore=tests/test_serve_http.py -p no:cacheprovider --tb=short > $OUT/gpu_tests.txt 2>&1
tail -3 $OUT/gpu_tests.txt >> $L
echo "=== headline bench_train --profile $(date +%T)" >> $L
mkdir -p $OUT/headline
timeout 230 python3 benchmarks/bench_train.py --profile --out $OUT/headline 2>&1 | grep -v "Warning\|warnings.warn\|_warn_once" > $OUT/headline/bench_train.txt
grep -A14 "^size" $OUT/headline/bench_train.txt >> $L
head -8 $OUT/headline/bench_train_profile.txt >> $L
date >> $L
