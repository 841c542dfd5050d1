"""Scratch: bench_train with nn.functional.dropout in AdaptiveLayer.step (the previous dropout)."""
import sys

import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
import bench_train as bt  # noqa: E402

import climber.model as m  # noqa: E402

m.dropout = lambda x, p, training: F.dropout(x, p, training)
print("old dropout (F.dropout)", flush=True)
sys.argv = ["bench_train.py"] + sys.argv[1:]
bt.main()
