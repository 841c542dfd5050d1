"""Screen only (not a product feature): validate and keep best/ with an exponential moving average
of every parameter (decay EMA, default 0.99), by patching climber.train's setup and _validate, then
running `climber compare` with the arguments given. Fresh runs only (the average is not saved).

    OMP_NUM_THREADS=1 python benchmarks/results/table2/kuairand-cpu-screen/ema_screen.py compare --data ... 
"""
import os
import sys

import torch

import climber.train as T
from climber.cli import main

DECAY = float(os.environ.get("EMA", "0.99"))
_setup, _validate = T.setup, T._validate
AVERAGES = {}


def setup(*a, **k):
    run = _setup(*a, **k)
    params = list(run.model.parameters())
    ema = [p.detach().clone() for p in params]

    def update(opt, args, kwargs):
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - DECAY)

    run.opt.register_step_post_hook(update)
    AVERAGES[id(run.model)] = params, ema
    return run


def validate(run, epoch):
    params, ema = AVERAGES[id(run.model)]
    with torch.no_grad():
        live = [p.detach().clone() for p in params]
        for p, e in zip(params, ema):
            p.copy_(e)
    try:
        _validate(run, epoch)  # scores, logs and saves best/ with the averaged weights
    finally:
        with torch.no_grad():
            for p, w in zip(params, live):
                p.copy_(w)


T.setup, T._validate = setup, validate
sys.exit(main(sys.argv[1:]))
