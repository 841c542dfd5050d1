set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m benchmarks.bench_serving --device cuda --base 800 12 1000 --lengths 800 --layers 12 --candidates 1000 --cuda-graphs --max-seconds 1.5"
for v in sdpa softmax sdpa2 softmax2; do
  case $v in softmax*) cp .gpujob/model_softmax.py climber/model.py;; sdpa*) git checkout climber/model.py 2>/dev/null || cp .gpujob/model_sdpa.py climber/model.py;; esac
  timeout 60 $B --name ab_$v 2>&1 | grep -A1 "^  L  layers" | tail -1 | sed "s/^/$v: /"
  cp benchmarks/results/ab_$v.json $OUT/ 2>/dev/null
done
