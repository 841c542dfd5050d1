#!/usr/bin/env bash
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/log.txt
date > $L
echo "=== static m=8, new dropout (planes) $(date +%T)" >> $L
timeout 55 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --steps 8 --out /tmp/new > $OUT/new.txt 2>&1
grep "d=512" $OUT/new.txt | cut -c1-200 >> $L
echo "=== static m=8, old dropout $(date +%T)" >> $L
timeout 50 python3 scratch/bench_olddrop.py --batch "" --paper-ms 8 --steps 8 --out /tmp/old > $OUT/old.txt 2>&1
grep "d=512" $OUT/old.txt | cut -c1-200 >> $L
date >> $L
