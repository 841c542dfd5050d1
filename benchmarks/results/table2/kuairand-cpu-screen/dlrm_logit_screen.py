"""Screen only (not a product feature): Climber with DLRM's logit added to its own.

The pooled readout already hands Climber's head DLRM's fields (the candidate, each block's mean
history embedding, their dot products), yet on KuaiRand Climber validates below DLRM. Here the
same fields also go through a head of their own, DLRM's top MLP, and its logits are added to
Climber's: logit = head(everything) + dlrm_head(pooled fields, user vector). The DLRM sub-model
then gets the gradient of the whole loss directly, as DLRM alone does, and the attention path
learns a correction on top. Patches `climber.model.Climber`, then runs `climber` with the
arguments given:

    OMP_NUM_THREADS=1 python benchmarks/results/table2/kuairand-cpu-screen/dlrm_logit_screen.py compare ...
"""
import sys

from torch import nn

import climber.model as M
from climber.baselines.common import mlp_head
from climber.cli import main

_init, _fuse = M.Climber.__init__, M.Climber.fuse_and_head


def init(self, cfg):
    _init(self, cfg)
    n = cfg.n_blocks + 1  # the fields [c, pooled_1 .. pooled_K]
    width = n * cfg.d_model + n * (n - 1) // 2 + (cfg.d_model if cfg.user_feature_cards else 0)
    self.dlrm_head = mlp_head(cfg, width)
    for m in self.dlrm_head.modules():  # Climber's init (init_weights): N(0, 0.02), zero biases
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def fuse_and_head(self, e, c, scenario, user, match, pooled):
    logits = _fuse(self, e, c, scenario, user, match, pooled)
    z = self.with_user(M._pooled_features(c, pooled).to(logits.dtype), user)
    return logits + self.dlrm_head(z)


M.Climber.__init__, M.Climber.fuse_and_head = init, fuse_and_head
sys.exit(main(sys.argv[1:]))
