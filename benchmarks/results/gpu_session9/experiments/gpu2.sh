#!/usr/bin/env bash
# session 9, call 2: C = small-table lookups + sigmoid-form GELU; idle-gap diagnosis
export PYTHONUNBUFFERED=1 PYTHONPATH=.
L=$OUT/log.txt
date > $L
echo "=== static m=8 C $(date +%T)" >> $L
timeout 100 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/c 2>&1 | grep "^paper\|Error" >> $L
echo "=== gaps C $(date +%T)" >> $L
timeout 150 python3 scratch/gaps.py 2>&1 | grep -v "Warn\|warn" >> $L
echo "=== gaps B $(date +%T)" >> $L
PYTHONPATH=scratch/vB:. timeout 150 python3 scratch/gaps.py 2>&1 | grep -v "Warn\|warn" >> $L
date >> $L
