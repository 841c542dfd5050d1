"""Scratch: bench_train with compile/inductor/dropout switches from env."""
import os, sys, dataclasses
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "scratch")
import torch
import torch._inductor.config as ic
from climber.model import Climber
import bench_train as bt

mode = os.environ.get("CMODE") or None
for flag in filter(None, os.environ.get("CFLAGS", "").split(",")):
    setattr(ic, flag, True)
    print("inductor", flag, "=", getattr(ic, flag), flush=True)

def compile_layers(self):
    for layer in self.layers:
        layer.step = torch.compile(layer.step, mode=mode)
        layer.history = torch.compile(layer.history, mode=mode)
Climber.compile_layers = compile_layers

if os.environ.get("NOBIAS"):
    from climber.model import BlockLinear
    BlockLinear.mm = lambda self, x: torch.bmm(x, self.weight)
if os.environ.get("DROPOUT"):
    orig = bt.model_config
    bt.model_config = lambda *a, **k: dataclasses.replace(orig(*a, **k), dropout=float(os.environ["DROPOUT"]))
print("variant mode", mode, "flags", os.environ.get("CFLAGS"), "dropout", os.environ.get("DROPOUT"), "nobias", os.environ.get("NOBIAS"), flush=True)
sys.argv = ["bench_train.py"] + sys.argv[1:]
bt.main()
