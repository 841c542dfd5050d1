#!/usr/bin/env bash
# session-5 experiment run 1 (not committed)
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/log.txt
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch,triton;print(torch.__version__, torch.version.cuda, triton.__version__)"; git log -1 --format=%h 2>/dev/null; } > $OUT/env.txt 2>&1
date >> $L
timeout 150 python3 -m pytest -q -m gpu tests/test_attention_fast.py -p no:cacheprovider 2>&1 | tail -12 >> $L
for v in "OLDSEQ=1 DBIAS32=1" "OLDSEQ=1" "X=1" "RES16=1"; do
  echo "=== variant $v $(date +%T)" >> $L
  envs=""; for kv in $v; do envs="$envs CLIMBER_EXP_$kv"; done
  prof=""; [ "$v" = "RES16=1" ] && prof="--profile"
  env $envs timeout 200 python3 benchmarks/bench_train.py --batch "" --paper-ms 8 --out /tmp/v $prof 2>&1 | grep -v Warning | grep "d=512\|paper \|Error\|error" >> $L
  [ -f /tmp/v/bench_train_profile.txt ] && cp /tmp/v/bench_train_profile.txt $OUT/profile_res16.txt
done
echo "=== attention $(date +%T)" >> $L
timeout 120 python3 benchmarks/bench_attention.py --variants flash,fused-kernel,fused --out /tmp/a 2>&1 | grep -A12 "^variant" >> $L
CLIMBER_EXP_DBIAS32=1 timeout 60 python3 benchmarks/bench_attention.py --variants fused-kernel --out /tmp/a32 2>&1 | grep -A5 "^variant" >> $L
echo "=== aot $(date +%T)" >> $L
TORCH_LOGS=aot_graphs timeout 120 python3 scratch/aot.py > $OUT/aot.txt 2>&1
date >> $L
