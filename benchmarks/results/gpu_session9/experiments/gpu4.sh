#!/usr/bin/env bash
# session 9, call 4: F = working tree (lookups, sigmoid GELU, 1/tau in the front, compiled _fuse_and_head): static m=8, headline, GPU tests
export PYTHONUNBUFFERED=1 PYTHONPATH=.
L=$OUT/log.txt
date > $L
echo "=== static m=8 F $(date +%T)" >> $L
timeout 100 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/f 2>&1 | grep "^paper\|Error" >> $L
echo "=== headline bench_train --profile $(date +%T)" >> $L
mkdir -p $OUT/headline
timeout 270 python3 benchmarks/bench_train.py --profile --out $OUT/headline 2>&1 | grep -v "Warning\|warnings.warn\|_warn_once\|pow_by_natural" > $OUT/headline/bench_train.txt
grep -A14 "^size" $OUT/headline/bench_train.txt >> $L
tail -3 $OUT/headline/bench_train.txt >> $L
head -8 $OUT/headline/bench_train_profile.txt >> $L
echo "=== gpu tests $(date +%T)" >> $L
timeout 170 python3 -m pytest -q -m gpu tests/ --ignore=tests/test_serve_http.py -p no:cacheprovider --tb=short > $OUT/gpu_tests.txt 2>&1
tail -3 $OUT/gpu_tests.txt >> $L
date >> $L
