#!/bin/bash
# One screen run: scripts used for this folder (run from the repository root).
# usage: screen.sh NAME MODEL "SEEDS" [extra compare flags...]   -> runs/screen/NAME, runs/screen/log_NAME_sSEEDS.txt
# The protocol of table2/kuairand/compare.md, with --train-only (no test) and one thread per run;
# extra flags (e.g. --lrs 1e-3, --dropout 0.3) come last and override it.
name=$1; model=$2; seeds=$3; shift 3
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
start=$(date +%s)
.venv/bin/climber compare --data data_cache/kuairand --out runs/screen/$name --models $model --seeds $seeds \
  --preset small --lrs 3e-3 --embedding-lr-mults 10 --embedding-weight-decays 0 --train-negative-counts 16 \
  --warmup-steps 50 --patience 4 --device cpu --num-workers 1 --log-every 50 --batch-size 256 --epochs 20 \
  --threads 1 --train-only "$@" > runs/screen/log_${name}_s${seeds// /}.txt 2>&1
echo "rc=$? wall=$(( $(date +%s) - start ))s" >> runs/screen/log_${name}_s${seeds// /}.txt
