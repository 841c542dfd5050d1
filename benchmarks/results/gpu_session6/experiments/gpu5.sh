#!/usr/bin/env bash
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/log.txt
date > $L
echo "=== static m=8, new dropout $(date +%T)" >> $L
timeout 75 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/new > $OUT/bench_static_newdrop.txt 2>&1
grep "d=512" $OUT/bench_static_newdrop.txt | cut -c1-260 >> $L
echo "=== static m=8, old dropout $(date +%T)" >> $L
timeout 75 python3 scratch/bench_olddrop.py --batch "" --paper-ms 8 --out /tmp/old > $OUT/bench_static_olddrop.txt 2>&1
grep "d=512" $OUT/bench_static_olddrop.txt | cut -c1-260 >> $L
echo "=== tests + lastfm $(date +%T)" >> $L
timeout 100 python3 -m climber train --data .gpudata/lastfm --out /tmp/lf --preset small --d-model 128 --n-layers 8 --attention fused --compile --max-steps 600 --eval-every 200 --log-every 100 > /tmp/lf.log 2>&1 &
timeout 90 python3 -m pytest -q tests/test_dropout.py -p no:cacheprovider 2>&1 | tail -5 >> $L
wait
grep -o "step [0-9]*: valid.*" /tmp/lf.log | sed 's/(best.*//' >> $L; tail -c 250 /tmp/lf.log >> $L
cp /tmp/lf/valid_log.csv $OUT/lastfm_valid_log.csv 2>/dev/null
echo "=== dynamic (m=1 then 8), new dropout $(date +%T)" >> $L
timeout 100 python3 benchmarks/bench_train.py --batch "" --paper-ms 1,8 --profile --out /tmp/dyn > $OUT/bench_dyn_newdrop.txt 2>&1
grep "d=512" $OUT/bench_dyn_newdrop.txt | cut -c1-260 >> $L
cp /tmp/dyn/bench_train_profile.txt $OUT/ 2>/dev/null; cp /tmp/dyn/bench_train.json $OUT/bench_dyn_newdrop.json 2>/dev/null
date >> $L
