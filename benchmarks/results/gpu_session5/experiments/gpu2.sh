#!/usr/bin/env bash
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/log.txt
date > $L
timeout 150 python3 -m pytest -q -m gpu tests/test_attention_fast.py -p no:cacheprovider 2>&1 | tail -12 >> $L
for v in "X=1" "RES16=1"; do
  echo "=== variant $v $(date +%T)" >> $L
  prof=""; [ "$v" = "RES16=1" ] && prof="--profile"
  env CLIMBER_EXP_$v timeout 200 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/v $prof 2>&1 | grep -v Warning | grep "d=512\|paper \|Error\|error" >> $L
done
cp /tmp/v/bench_train_profile.txt $OUT/profile_res16.txt
for m in res16 res32 split; do
  echo "=== lastfm $m $(date +%T)" >> $L
  att=fused; [ $m = split ] && att=split
  env CLIMBER_EXP_$([ $m = res16 ] && echo RES16 || echo X)=1 timeout 150 python3 -m climber train --data .gpudata/lastfm --out /tmp/lf_$m --preset small --d-model 128 --n-layers 8 --attention $att --compile --max-steps 600 --eval-every 200 --log-every 100 > /tmp/lf_$m.log 2>&1
  grep -o "step [0-9]*: valid.*" /tmp/lf_$m.log | sed 's/(best.*//' >> $L; tail -c 300 /tmp/lf_$m.log >> $L; echo >> $L
done
echo "=== sweep $(date +%T)" >> $L
timeout 200 python3 benchmarks/bench_attention.py --sweep --shapes 512x8x208x64,64x8x800x64 --reps 10 --out /tmp/s 2>&1 | grep -v Warning | tail -40 >> $L
date >> $L
