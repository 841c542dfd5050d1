"""Run bench_train with fused_attention.TILES overridden: tiles_bench.py KERNEL BM,BN,W,S -- bench args"""
import runpy
import sys

import climber.fused_attention as fa

kernel, tiles = sys.argv[1], tuple(int(x) for x in sys.argv[2].split(","))
fa.TILES[kernel] = tiles
print("TILES", fa.TILES, flush=True)
sys.argv = ["benchmarks/bench_train.py"] + sys.argv[4:]
runpy.run_path("benchmarks/bench_train.py", run_name="__main__")
