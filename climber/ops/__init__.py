"""Attention backends of the Adaptive Transformer Layer, one interface, chosen once.

A backend is three functions with the meaning fixed by `climber/ops/reference.py`:

    seq = prepare(pos, tim, pb, tb, valid, n_hist, dtype)   # f_b and the mask, once per forward
    out, seq = attend(qkv, inv_tau, seq)                    # one layer's SUMI attention
    # new history tokens and candidates against a history cache, the match readout's features (or None)
    out, feats = attend_cached(q, k, v, inv_tau, k_hist, v_hist, hist_bias, self_bias, hist_valid, match, new_bias)

"reference" is plain PyTorch and runs anywhere; "triton" is `climber/ops/triton_attention.py`,
for CUDA GPUs (or Triton's CPU interpreter in tests). Neither module imports the other. The
model holds a backend as a plain attribute, not a parameter, so a checkpoint moves freely
between them (`climber/runtime.py` picks one). `attend_cached` serves tokens against a history
cache: the candidates of `Climber.score`, an (M, L + 1) problem, and in `Climber.fold` also the
new history events (n rows, causal among themselves), their keys a second segment beside the
cache's; with `match` it also returns the candidates' match readout features from the same
logits. The Triton version is forward only (serving), one kernel per layer for both kinds of
token that reads the cached keys and values once per tile of tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from climber.config import BACKENDS
from climber.ops import reference, triton_attention


@dataclass(frozen=True)
class Attention:
    name: str
    prepare: Callable
    attend: Callable
    attend_cached: Callable


REFERENCE = Attention("reference", reference.prepare, reference.attend, reference.attend_cached)
TRITON = Attention("triton", triton_attention.prepare, triton_attention.attend, triton_attention.attend_cached)


def backend(name: str, device: torch.device | str) -> Attention:
    """The backend `name` for `device`: "auto" is "triton" where its kernels can run, else
    "reference"; "triton" where they cannot is an error."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, not {name!r}")
    if name == "auto":
        return TRITON if device.type == "cuda" and triton_attention.available(device) else REFERENCE
    if name == "triton" and not triton_attention.available(device):
        raise ValueError(f"the triton attention backend needs a CUDA GPU with Triton; {device} has none")
    return TRITON if name == "triton" else REFERENCE
