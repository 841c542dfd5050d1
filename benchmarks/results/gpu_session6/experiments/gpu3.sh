#!/usr/bin/env bash
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/log.txt
date > $L
for op in 0 1; do
  echo "=== bench_attention ONE_PASS=$op $(date +%T)" >> $L
  CLIMBER_ONE_PASS=$op timeout 120 python3 benchmarks/bench_attention.py --shapes 512x8x208x64,64x8x800x64 --variants flash,fused-kernel,fused --reps 20 --out /tmp/ba$op 2>&1 | grep -v Warn | tail -12 >> $L
done
echo "=== sweep ONE_PASS=1 $(date +%T)" >> $L
CLIMBER_ONE_PASS=1 timeout 150 python3 benchmarks/bench_attention.py --sweep --shapes 512x8x208x64 --reps 10 --out /tmp/sw 2>&1 | grep -v Warn | tail -14 >> $L
for op in 0 1; do
  echo "=== bench_train static ONE_PASS=$op $(date +%T)" >> $L
  CLIMBER_ONE_PASS=$op timeout 150 python3 scratch/bench_variant.py --batch "" --paper-ms 8 --out /tmp/bt$op 2>&1 | grep "d=512" | cut -c1-300 >> $L
done
echo "=== dynamic profile + output code $(date +%T)" >> $L
TORCH_LOGS=output_code timeout 200 python3 scratch/bench_variant.py --batch "" --paper-ms 1,8 --profile --out /tmp/dyn > /tmp/dyn.log 2>&1
grep "d=512" /tmp/dyn.log | cut -c1-300 >> $L
gzip -c /tmp/dyn.log > $OUT/dyn_output_code.log.gz
cp /tmp/dyn/bench_train_profile.txt $OUT/dyn_profile.txt
echo "=== gpu tests ONE_PASS=1 $(date +%T)" >> $L
timeout 200 python3 -m pytest -q -m gpu tests/test_attention_fast.py -p no:cacheprovider 2>&1 | tail -5 >> $L
date >> $L
