#!/usr/bin/env bash
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/log.txt
date > $L; nvidia-smi --query-gpu=name,memory.used --format=csv >> $L
md5sum .gpudata/lastfm/* 2>/dev/null | head -20 >> $L
# four LastFM trainings at once in the background (small model: launch-bound)
for v in final oldtiles oldgrad split; do
  att=fused; [ $v = split ] && att=split
  ab=$v; [ $v = final -o $v = split ] && ab=""
  env CLIMBER_AB=$ab timeout 420 python3 scratch/ab_train.py train --data .gpudata/lastfm --out /tmp/lf_$v --preset small --d-model 128 --n-layers 8 --attention $att --compile --max-steps 600 --eval-every 200 --log-every 100 > /tmp/lf_$v.log 2>&1 &
done
timeout 200 python3 -m pytest -q -m gpu tests/test_attention_fast.py -p no:cacheprovider 2>&1 | tail -15 >> $L
for ab in "" "oldtiles,oldgrad"; do
  echo "=== gradcheck AB=$ab $(date +%T)" >> $L
  CLIMBER_AB=$ab timeout 120 python3 scratch/gradcheck.py .gpudata/lastfm 256 >> $L 2>&1
done
wait
for v in final oldtiles oldgrad split; do
  echo "=== lastfm $v" >> $L
  grep -o "AB variant.*\|step [0-9]*: valid.*" /tmp/lf_$v.log | sed 's/(best.*//' >> $L; tail -c 400 /tmp/lf_$v.log >> $L; echo >> $L
  cp /tmp/lf_$v/train_log.csv $OUT/train_$v.csv 2>/dev/null
done
date >> $L
