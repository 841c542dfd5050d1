#!/usr/bin/env bash
# session 7, call 1: correctness of the bias-free model + in-kernel f_b, then A/B timings
export PYTHONUNBUFFERED=1
R=$PWD
L=$OUT/log.txt
date > $L
(python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv) >> $L 2>&1
echo "=== lastfm A and D + gpu tests (working tree = C) $(date +%T)" >> $L
for v in A D; do
  (cd scratch/v$v && PYTHONPATH=. timeout 240 python3 -m climber train --data $R/.gpudata/lastfm --out /tmp/lf$v --preset small --d-model 128 --n-layers 8 --attention fused --compile --max-steps 600 --eval-every 200 --log-every 100 > /tmp/lf$v.log 2>&1) &
done
PYTHONPATH=. timeout 240 python3 -m pytest -q -m gpu tests/test_attention_fast.py -p no:cacheprovider 2>&1 | tail -8 > $OUT/gpu_tests.txt
wait
for v in A D; do echo "-- lastfm $v" >> $L; grep -o "step [0-9]*: valid.*" /tmp/lf$v.log | sed 's/(best.*//' >> $L; tail -c 400 /tmp/lf$v.log >> $L; echo >> $L; done
cat $OUT/gpu_tests.txt >> $L
for v in A C; do
  echo "=== bench_attention $v $(date +%T)" >> $L
  PYTHONPATH=scratch/v$v:. timeout 100 python3 benchmarks/bench_attention.py --shapes 512x8x208x64,64x8x800x64 --variants flash,fused-kernel,fused --reps 20 --out /tmp/ba$v 2>&1 | grep -v Warn | tail -12 >> $L
done
for v in A B C D; do
  echo "=== bench_train static m=8 $v $(date +%T)" >> $L
  PYTHONPATH=scratch/v$v:. timeout 100 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/bt$v 2>&1 | grep -v "Warn\|warn" | grep "d=512\|ms\|MFU" | cut -c1-300 >> $L
done
echo "=== profile D $(date +%T)" >> $L
PYTHONPATH=scratch/vD:. timeout 120 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --profile --out /tmp/pD > /tmp/pD.log 2>&1
grep "d=512" /tmp/pD.log | cut -c1-300 >> $L
cp /tmp/pD/bench_train_profile.txt $OUT/profile_D.txt
date >> $L
