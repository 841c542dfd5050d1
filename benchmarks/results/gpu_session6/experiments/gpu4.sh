#!/usr/bin/env bash
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/log.txt
date > $L
(python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv) >> $L 2>&1
echo "=== bench_train --profile $(date +%T)" >> $L
timeout 330 python3 benchmarks/bench_train.py --profile --out $OUT 2>&1 | grep -v "Warning\|warnings.warn" > $OUT/bench_train.txt
echo "=== gpu tests + lastfm $(date +%T)" >> $L
timeout 150 python3 -m climber train --data .gpudata/lastfm --out /tmp/lf --preset small --d-model 128 --n-layers 8 --attention fused --compile --max-steps 600 --eval-every 200 --log-every 100 > /tmp/lf.log 2>&1 &
timeout 150 python3 -m pytest -q -m gpu tests/test_attention_fast.py -p no:cacheprovider 2>&1 | tail -4 > $OUT/gpu_tests.txt
wait
grep -o "step [0-9]*: valid.*" /tmp/lf.log | sed 's/(best.*//' >> $L; tail -c 300 /tmp/lf.log >> $L
cp /tmp/lf/valid_log.csv $OUT/lastfm_valid_log.csv
echo "=== static m=8 $(date +%T)" >> $L
timeout 100 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/st 2>&1 | grep -v "Warning\|warnings.warn" > $OUT/bench_train_static_m8.txt
cp /tmp/st/bench_train.json $OUT/bench_train_static_m8.json
date >> $L
