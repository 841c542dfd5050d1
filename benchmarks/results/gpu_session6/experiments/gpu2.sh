#!/usr/bin/env bash
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/log.txt
date > $L
run() {  # name, "ENV=.. ENV2=..", extra bench args
  local name=$1 envs=$2 args=${3:-"--paper-ms 8"}
  echo "=== $name $(date +%T)" >> $L
  env $envs timeout 240 python3 scratch/bench_variant.py --batch "" $args --steps 10 --out /tmp/b_$name > /tmp/b_$name.log 2>&1
  grep "variant\|inductor\|d=512\|Error\|error" /tmp/b_$name.log | cut -c1-400 >> $L
}
run base X=1
run dyn X=1 "--paper-ms 1,8"
run nodrop DROPOUT=0
run coord CFLAGS=coordinate_descent_tuning
run maxat CMODE=max-autotune-no-cudagraphs
date >> $L
