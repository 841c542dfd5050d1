#!/usr/bin/env bash
# session 8, call 3 (as run): committed code B (a copy of the package in scratch/vB) vs one-pass
# backward with an fp32 dQ buffer E (scratch/vE) vs E + compiled front F (the working tree then)
export PYTHONUNBUFFERED=1
L=$OUT/log.txt
date > $L
echo "=== B compiled-gradient test $(date +%T)" >> $L
PYTHONPATH=scratch/vB:. timeout 120 python3 -m pytest -q -m gpu tests/test_attention_fast.py -k model_gradients -p no:logging -p no:cacheprovider --tb=long > $OUT/gpu_tests_B.txt 2>&1
tail -3 $OUT/gpu_tests_B.txt >> $L
echo "=== onepass gpu tests $(date +%T)" >> $L
PYTHONPATH=. timeout 200 python3 -m pytest -q -m gpu tests/test_attention_fast.py -p no:logging -p no:cacheprovider --tb=long > $OUT/gpu_tests_E.txt 2>&1
tail -3 $OUT/gpu_tests_E.txt >> $L
echo "=== static m=8 B $(date +%T)" >> $L
PYTHONPATH=scratch/vB:. timeout 90 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/b 2>&1 | grep "^paper" >> $L
echo "=== static m=8 E (onepass) $(date +%T)" >> $L
PYTHONPATH=scratch/vE:. timeout 90 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/e 2>&1 | grep "^paper\|Error" >> $L
for t in 32,128,4,3 64,64,4,2 32,64,4,2; do
  echo "=== static m=8 F (onepass + compiled front) bwd=$t $(date +%T)" >> $L
  PYTHONPATH=. timeout 90 python3 scratch/tiles_bench.py bwd $t -- --batch "" --paper-ms 8 --profile --out $OUT/F_${t//,/_} 2>&1 | grep "^paper\|Error" >> $L
done
echo "=== sweep onepass $(date +%T)" >> $L
PYTHONPATH=. timeout 200 python3 benchmarks/bench_attention.py --sweep --shapes 512x8x208x64,64x8x800x64 --out $OUT 2>&1 | grep -v "^{" > $OUT/sweep_E.txt
grep -A13 "tiles" $OUT/sweep_E.txt >> $L
echo "=== bench_attention onepass $(date +%T)" >> $L
PYTHONPATH=. timeout 120 python3 benchmarks/bench_attention.py --shapes 512x8x208x64,64x8x800x64 --variants flash,fused-kernel --out $OUT 2>&1 | grep -v "^{" > $OUT/bench_attention_E.txt
grep -A30 "^variant" $OUT/bench_attention_E.txt >> $L
date >> $L
