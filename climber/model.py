"""The Climber ranking model (PAPER.md section 2), in reading order.

1. Embeddings (`embeddings.py`, shared with the baselines): item id + item side features;
   history tokens add their action, their behaviour flags (one embedding per task and label)
   and scenario; candidate tokens add a target embedding and the request's scenario.
2. Multi-scale sequence extraction (MSE) happens in the data layer (`data/sumi.py`): each of
   the N_b = K strategies yields a sub-sequence, so inputs arrive as (B, K, L).
3. Adaptive Transformer Layers (ATL): K parallel homogeneous blocks with separate weights,
   stacked along a block dimension and run as one batched computation. Attention is
   softmax((Q K^T + f_b) / f_tc): f_tc a learned temperature per (layer, block, scenario,
   head) initialised at sqrt(d_head); f_b a bucketed relative position + time-gap bias per
   (block, scenario, head), shared by the layers of a block.
4. Block readout: the last layer's hidden state at each candidate token, E (B, M, K, d).
5. Bit-wise gating fusion (BGF): one ATL across the K block vectors (no bias, temperature
   from the scenario), then an element-wise squeeze-and-excitation gate.
6. Multi-task head: an MLP to one logit per task. With `target_product` (our addition, in the
   room PAPER.md 5 leaves for the readout) it also sees c * E_k, the candidate embedding times
   each block output: softmax attention returns a convex mix of history values and so drops
   how strongly the candidate matches the history, and an MLP learns products poorly; DLRM's
   dot products and HSTU's gating carry that signal (docs/design.md).

SUMI: candidates are appended after the history; history tokens never see candidates, so
`prefill` encodes the history once (returning per-layer keys and values) and `score` runs all
candidates against it. `forward` is exactly `score(prefill(...))` unless
`attention="joint"`, which runs the paper's literal joint masked sequence instead, or
"fused" on a GPU, which runs that joint sequence through the fused kernels (their mask skips
the candidate-candidate scores), the fastest way to train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from climber import fused_attention as fused
from climber.attention import (
    candidate_attention,
    history_attention,
    history_inputs,
    history_mask,
    joint_attention,
    position_buckets,
    resolve_impl,
    split_heads,
    time_buckets,
)
from climber.config import ModelConfig
from climber.embeddings import TokenEmbeddings


class BlockLinear(nn.Module):
    """K independent linear maps, no bias, applied to (B, K, S, d_in) in one batched matmul.

    History activations are (B, K, S, d) views of (K, B, S, d) memory (blocks first), so each
    map is one plain bmm over (K, B * S, d) with no layout copies in or out; other layouts
    are copied to it first. No bias (as PaLM and LLaMA): a bias's gradient is one more pass
    over the map's output per step, and fc1's bias made the GELU input a second stored
    activation beside the matmul's output (docs/design.md, "bias-free ATL")."""

    def __init__(self, k: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, d_in, d_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks_first(x).transpose(0, 1)

    def blocks_first(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, S, d_in) -> (K, B, S, d_out), contiguous."""
        B, K, S, d = x.shape
        return self.mm(x.transpose(0, 1).reshape(K, B * S, d)).view(K, B, S, -1)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """(K, N, d_in) -> (K, N, d_out)."""
        return torch.bmm(x, self.weight)


class BlockRMSNorm(nn.Module):
    """RMSNorm with a gain per block: the stack's output norm (the ATL's own norms feed a linear
    map, which absorbs a gain, so they have none: `rms_norm`)."""

    def __init__(self, k: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k, 1, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, S, d) or (K, N, d): weight (K, 1, d)
        return rms_norm(x) * self.weight


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last axis without a gain. Before a linear map a gain g is redundant,
    norm(x) * g @ W = norm(x) @ (diag(g) W), and its gradient is a sum over every token per
    step, one more pass over the layer's states (docs/design.md, "bias-free ATL")."""
    return F.rms_norm(x, (x.shape[-1],))


GELU_2U = math.sqrt(8 / math.pi)  # 2 sqrt(2 / pi): `gelu`'s sigmoid argument is 2 u


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU in its tanh form, 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3): the
    ATL's and BGF's activation. Compiled, as x sigmoid(2 u), the same function: inductor makes
    sigmoid one exp and one division, while erf (exact GELU) and tanh are long libdevice
    polynomials, which made the FFN's activation compute-bound. On the H200 at the paper
    step's FFN shape, forward + backward: erf 0.73 ms, tanh 0.58, this 0.51, a copy 0.41
    (docs/design.md). The tanh form differs from erf's by at most 4.7e-4 (mean 1.5e-4 on
    N(0, 9)), a tenth of a bf16 rounding."""
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(GELU_2U * x * (1 + 0.044715 * x * x))
    return F.gelu(x, approximate="tanh")


class AdaptiveLayer(nn.Module):
    """One ATL for all K blocks at once: pre-norm attention and GELU FFN, each with a residual;
    bias-free maps and gain-free norms (see `BlockLinear`, `rms_norm`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        K, d = cfg.n_blocks, cfg.d_model
        self.h = cfg.n_heads
        self.impl = cfg.attention
        self.qkv = BlockLinear(K, d, 3 * d)
        self.proj = BlockLinear(K, d, d)
        self.fc1 = BlockLinear(K, d, cfg.ffn_mult * d)
        self.fc2 = BlockLinear(K, cfg.ffn_mult * d, d)
        self.drop = nn.Dropout(cfg.dropout)

    def _packed_qkv(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, S, d) -> (K, B, S, 3, H, dh)
        return self.qkv_blocks_first(x.transpose(0, 1))

    def _qkv(self, x: torch.Tensor):  # (B, K, S, d) -> 3 x (B, K, H, S, dh)
        return split_heads(self._packed_qkv(x).transpose(0, 1))

    def _merge(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Residual add of the attention output y (B, K, H, S, dh), then the FFN."""
        B, K, H, S, dh = y.shape
        x = x + self.drop(self.proj(y.transpose(2, 3).reshape(B, K, S, H * dh)))
        return x + self.drop(self.fc2(gelu(self.fc1(rms_norm(x)))))

    def joint(self, x, bias, tau, allowed):
        q, k, v = self._qkv(x)
        return self._merge(x, joint_attention(q, k, v, bias, tau, allowed))

    def qkv_blocks_first(self, h: torch.Tensor) -> torch.Tensor:
        """States h (K, B, S, d) -> packed qkv (K, B, S, 3, H, dh), contiguous; no copy of h when
        h is contiguous (training and prefill), one for the (B, K, ...) layouts of `_qkv`."""
        K, B, S, d = h.shape
        return self.qkv_rows(h.reshape(K, B * S, d)).view(K, B, S, 3, self.h, d // self.h)

    def qkv_rows(self, h: torch.Tensor) -> torch.Tensor:
        """States h (K, N, d), N tokens per block -> packed qkv (K, N, 3 d)."""
        return self.qkv.mm(rms_norm(h))

    def step(self, h, y, nxt: AdaptiveLayer | None):
        """Training's fused pass, one compiled region per attention call: this layer's output
        projection, residuals and FFN on states h (K, B * S, d) and the attention output y (B,
        K, H, S, dh) stored (K, B, S, H, dh), then the next layer's norm and qkv projection ->
        (next states, next packed qkv (K, B, S, 3, H, dh) or None).

        Everything stays blocks first, so no graph input, output or gradient is a transposed
        view (AOT autograd would copy such a gradient to the traced layout), and each residual
        state is made and read for the next qkv in one region, so the two parts of its gradient
        are summed in that region's compiled backward, not by an eager add between graphs.
        The states are 3-d, one token axis: the norm weights' and biases' gradients are then
        sums over one axis, which inductor's dynamic-shape code indexes without dividing by
        the symbolic sequence length per element (with (K, B, S, d) states those reductions
        ran 3.7x slower once shapes turned dynamic; docs/design.md)."""
        B, K, H, S, dh = y.shape
        a = y.permute(1, 0, 3, 2, 4).reshape(h.shape)  # a view: the kernel's output order
        h = h + self.drop(self.proj.mm(a))
        h = h + self.drop(self.fc2.mm(gelu(self.fc1.mm(rms_norm(h)))))
        return h, (None if nxt is None else nxt.qkv_rows(h).view(K, B, S, 3, H, dh))

    def history(self, h, hist, tau):
        """History states h (K, B, L, d), blocks first and contiguous -> the next ones, the same,
        and this layer's (k, v), (B, K, H, L, dh) views, for the candidates (prefill)."""
        x = h.transpose(0, 1)
        qkv = self._packed_qkv(x)
        h = self._merge(x, history_attention(qkv, hist, tau, self.impl)).transpose(0, 1)
        _, k, v = split_heads(qkv.transpose(0, 1))
        return h, (k, v)

    def candidates(self, c, kv, bias_hist, bias_self, tau, hist_mask):
        q, k, v = self._qkv(c)
        return self._merge(c, candidate_attention(q, k, v, *kv, bias_hist, bias_self, tau, hist_mask))


class BitwiseGatingFusion(nn.Module):
    """BGF: attention across the K block vectors, then a squeeze-and-excitation gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        K, d = cfg.n_blocks, cfg.d_model
        self.h = cfg.n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.ffn_mult * d), nn.Linear(cfg.ffn_mult * d, d)
        self.log_tau = nn.Parameter(torch.full((cfg.n_scenarios, cfg.n_heads), math.log(math.sqrt(cfg.d_head))),
                                    requires_grad=cfg.adaptive)
        r = max(1, K * d // cfg.se_reduction)
        self.squeeze, self.excite = nn.Linear(K * d, r), nn.Linear(r, K * d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, e: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        B, M, K, d = e.shape
        q, k, v = self.qkv(self.norm1(e)).view(B, M, K, 3, self.h, d // self.h).permute(3, 0, 1, 4, 2, 5)
        tau = self.log_tau[scenario].exp()[:, None, :, None, None]  # (B, 1, H, 1, 1)
        a = torch.softmax((q @ k.transpose(-1, -2)).float() / tau, dim=-1).to(v.dtype) @ v  # (B, M, H, K, dh)
        g = e + self.drop(self.proj(a.transpose(2, 3).reshape(B, M, K, d)))
        g = g + self.drop(self.fc2(gelu(self.fc1(self.norm2(g)))))
        g = g.reshape(B, M, K * d)
        return g * torch.sigmoid(self.excite(F.relu(self.squeeze(g))))  # bit-wise gate


@dataclass
class HistoryCache:
    """What `prefill` returns: per-layer history keys/values and what candidates need."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (B, K, H, L, dh) each
    hist_mask: torch.Tensor  # (B, K, L)
    hist_time: torch.Tensor  # (B, K, L)
    scenario: torch.Tensor  # (B,) request scenario the cache was computed under
    user: torch.Tensor  # (B,)


class Climber(TokenEmbeddings):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)  # 1. embeddings, shared by all blocks (climber/embeddings.py)
        d, K, H, T = cfg.d_model, cfg.n_blocks, cfg.n_heads, len(cfg.tasks)
        # 3. ATL stack; adaptive tables are indexed [block, scenario, head, bucket]
        tables = (K, cfg.n_scenarios) if cfg.adaptive else (1, 1)
        self.pos_bias = nn.Parameter(torch.zeros(*tables, H, cfg.pos_buckets))
        self.time_bias = nn.Parameter(torch.zeros(*tables, H, cfg.time_buckets))
        self.log_tau = nn.Parameter(torch.full((cfg.n_layers, *tables, H), math.log(math.sqrt(cfg.d_head))),
                                    requires_grad=cfg.adaptive)
        self.layers = nn.ModuleList(AdaptiveLayer(cfg) for _ in range(cfg.n_layers))
        self.norm_out = BlockRMSNorm(K, d)
        # 5. fusion and 6. head
        self.bgf = BitwiseGatingFusion(cfg) if cfg.bgf else None
        dims = _head_dims(cfg)[:-1]
        mlp: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mlp += [nn.Linear(a, b), nn.GELU(), nn.Dropout(cfg.dropout)]
        self.head = nn.Sequential(*mlp, nn.Linear(dims[-1], T))
        self.apply(self._init)
        for layer in self.layers:  # residual branches scaled for depth
            for lin in (layer.proj, layer.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    # ---- 3. adaptive attention parameters -----------------------------------------------------
    def _tau(self, scenario: torch.Tensor) -> torch.Tensor:
        """(n_layers, B, K, H, 1, 1) dynamic temperatures f_tc(layer, block, scenario)."""
        K = self.cfg.n_blocks
        s = scenario if self.cfg.adaptive else torch.zeros_like(scenario)
        tau = self.log_tau[:, :, s].exp().permute(0, 2, 1, 3)  # (N_L, B, K or 1, H)
        return tau.expand(-1, -1, K, -1)[..., None, None]

    def _bias(self, scenario, rel_pos, dt) -> torch.Tensor:
        """f_b(block, scenario): rel_pos, dt broadcastable to (B, K, Sq, Sk) -> (B, K, H, Sq, Sk)."""
        cfg = self.cfg
        s = scenario if cfg.adaptive else torch.zeros_like(scenario)
        blk = torch.arange(self.pos_bias.shape[0], device=s.device)
        pb = position_buckets(rel_pos, cfg.pos_buckets)
        tb = time_buckets(dt, cfg.time_buckets)
        B = s.shape[0]
        idx_b = s.view(B, 1, 1, 1, 1)
        idx_k = blk.view(1, -1, 1, 1, 1)
        idx_h = torch.arange(cfg.n_heads, device=s.device).view(1, 1, -1, 1, 1)
        bias = self.pos_bias[idx_k, idx_b, idx_h, pb[:, :, None]] + self.time_bias[idx_k, idx_b, idx_h, tb[:, :, None]]
        return bias.expand(-1, cfg.n_blocks, -1, -1, -1)

    # ---- SUMI: prefill the history once, then score all candidates ------------------------------
    def prefill(self, b: dict) -> HistoryCache:
        """Encode the history through every layer of every block; keep each layer's keys/values."""
        h = self.embed_history(b).transpose(0, 1).contiguous()  # (K, B, L, d): BlockLinear's layout
        t = b["hist_time"]
        # f_b built densely once, shared by the layers (tables + times -> (B, K, H, L, L))
        hist = history_inputs(b["hist_mask"], t, b["req_scenario"], self.pos_bias, self.time_bias, self.cfg.attention)
        tau = self._tau(b["req_scenario"])
        kv = []
        for layer, tau_l in zip(self.layers, tau):
            h, kv_l = layer.history(h, hist, tau_l)
            kv.append(kv_l)
        return HistoryCache(kv, b["hist_mask"], t, b["req_scenario"], b["user"])

    def score(self, cache: HistoryCache, cand_item: torch.Tensor, req_time: torch.Tensor) -> torch.Tensor:
        """Logits (B, M, T) for candidates (B, M) against a prefilled history."""
        B, M = cand_item.shape
        K, L = self.cfg.n_blocks, cache.hist_mask.shape[-1]
        c0 = self.embed_candidates(cand_item, cache.scenario)  # (B, M, d)
        c = c0[:, None].expand(B, K, M, -1)
        # every candidate sits at position L with the request's time
        rel = (L - torch.arange(L, device=c.device)).view(1, 1, 1, L)
        dt = (req_time[:, None, None] - cache.hist_time)[:, :, None, :]  # (B, K, 1, L)
        bias_hist = self._bias(cache.scenario, rel, dt)
        zero = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=c.device)
        bias_self = self._bias(cache.scenario, zero, zero)
        tau = self._tau(cache.scenario)
        for layer, tau_l, kv in zip(self.layers, tau, cache.kv):
            c = layer.candidates(c, kv, bias_hist, bias_self, tau_l, cache.hist_mask)
        return self._fuse_and_head(self.norm_out(c).permute(0, 2, 1, 3), c0, cache.scenario, cache.user)

    def _joint_tokens(self, b: dict):
        """The joint [history; candidates] sequence's parts: history embeddings h (B, K, L, d),
        candidate embeddings c0 (B, M, d), and per token its time (candidates: the request's)
        and key validity, (B, K, L + M)."""
        h = self.embed_history(b)
        B, K, _, _ = h.shape
        M = b["cand_item"].shape[1]
        c0 = self.embed_candidates(b["cand_item"], b["req_scenario"])
        t = torch.cat([b["hist_time"], b["req_time"][:, None, None].expand(B, K, M)], dim=-1)
        valid = torch.cat([b["hist_mask"], b["cand_mask"][:, None].expand(B, K, M)], dim=-1)
        return h, c0, t, valid

    def forward_joint(self, b: dict) -> torch.Tensor:
        """Reference path: the paper's literal [history; candidates] sequence with a SUMI mask."""
        h, c0, t, valid = self._joint_tokens(b)
        B, K, L, _ = h.shape
        M = c0.shape[1]
        x = torch.cat([h, c0[:, None].expand(B, K, M, -1)], dim=2)
        pos = torch.cat([torch.arange(L), torch.full((M,), L)]).to(x.device)
        bias = self._bias(b["req_scenario"], (pos[:, None] - pos[None, :])[None, None],
                          t[..., :, None] - t[..., None, :])
        allowed = history_mask(valid, n_hist=L)  # joint_mask
        for layer, tau_l in zip(self.layers, self._tau(b["req_scenario"])):
            x = layer.joint(x, bias, tau_l, allowed)
        return self._fuse_and_head(self.norm_out(x[:, :, L:]).permute(0, 2, 1, 3), c0, b["req_scenario"], b["user"])

    def _fuse_and_head(self, e: torch.Tensor, c: torch.Tensor, scenario: torch.Tensor,
                       user: torch.Tensor) -> torch.Tensor:
        """Block outputs e (B, M, K, d) and candidate embeddings c (B, M, d) -> logits (B, M, T)."""
        B, M, K, d = e.shape
        y = self.bgf(e, scenario) if self.bgf is not None else e.reshape(B, M, K * d)
        if self.cfg.target_product:  # c * E_k: how well the candidate matches each block's readout
            y = torch.cat([y, (c[:, :, None].to(e.dtype) * e).reshape(B, M, K * d)], dim=-1)
        return self.head(self.with_user(y, user))

    def fused_front(self, b: dict):
        """`forward_fused`'s inputs, one compiled region under `compile_layers` (eager, the
        embedding sums, the joint sequence's copy and cast and the (B, K, S, S) time-gap
        buckets are some 20 memory-bound kernels, and the embedding tables' backward a sort):
        the joint sequence x (K, B, L + M, d) in the compute dtype, BlockLinear's layout with the
        candidates at position L; candidate embeddings c0 (B, M, d); per token its time and key
        validity (B, K, L + M); time buckets (B, K, L + M, L + M) int16; every layer's 1 / tau
        (N_L, B * K, H) fp32 (one small kernel and its backward, not a few per layer)."""
        h, c0, t, valid = self._joint_tokens(b)
        K = h.shape[1]
        x = torch.cat([h.transpose(0, 1), c0[None].expand(K, -1, -1, -1)], dim=2)
        if torch.is_autocast_enabled(x.device.type):  # residual stream in the compute dtype (design.md)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        tb = time_buckets(t[..., :, None] - t[..., None, :], self.time_bias.shape[-1]).to(torch.int16)
        inv_tau = self._tau(b["req_scenario"]).reciprocal().reshape(len(self.layers), -1, self.cfg.n_heads).float()
        return x, c0, t, valid, tb, inv_tau

    def forward_fused(self, b: dict) -> torch.Tensor:
        """Training's fast path (attention="fused" on a GPU): the joint sequence [history;
        candidates] through the fused kernels, whose mask is the SUMI one (causal history;
        a candidate sees the history and itself), so each layer is one pass of batched
        matmuls over L + M tokens; the same computation as `score(prefill(b))`."""
        x, c0, t, valid, tb, inv_tau = self.fused_front(b)
        L = b["hist_item"].shape[-1]
        seq = history_inputs(valid, t, b["req_scenario"], self.pos_bias, self.time_bias, "fused", n_hist=L, tb=tb)
        layers = list(self.layers)
        qkv = layers[0].qkv_blocks_first(x)
        shape = x.shape
        x = x.flatten(1, 2)  # (K, B * (L + M), d), as `step` takes the states
        for layer, nxt, inv in zip(layers, layers[1:] + [None], inv_tau.unbind(0)):
            x, qkv = layer.step(x, fused.fused_attention(qkv, inv, seq.fused), nxt)
        e = self.norm_out(x.view(shape)[:, :, L:].transpose(0, 1)).permute(0, 2, 1, 3)  # (B, M, K, d)
        return self._fuse_and_head(e.contiguous(), c0, b["req_scenario"], b["user"])

    def forward(self, b: dict) -> torch.Tensor:
        """Batch of SUMI samples -> logits (B, M, T)."""
        impl = resolve_impl(self.cfg.attention, b["hist_item"].device)
        if impl == "joint":
            return self.forward_joint(b)
        if impl == "fused":
            return self.forward_fused(b)
        return self.score(self.prefill(b), b["cand_item"], b["req_time"])

    def compile_layers(self) -> None:
        """Regional torch.compile (`climber train --compile`): the code between attention calls
        (`AdaptiveLayer.step` for the fused training pass, `history` for prefill), shared by the
        layers (their weights are graph inputs), the fused pass's inputs (`fused_front`), and
        the fusion and head (`_fuse_and_head`; eager, some 200 small kernels forward and
        backward, whose launches left the GPU idle); the fused kernels and the f_b build stay
        outside. What `benchmarks/bench_train.py` times. Shapes start static and turn dynamic
        at the first change (torch's automatic dynamic shapes): real batches vary in history
        length (trimmed to the batch's longest) and candidate count, and one static graph per
        shape would soon exceed the recompile limit and fall back to eager."""
        self.fused_front = torch.compile(self.fused_front)
        self._fuse_and_head = torch.compile(self._fuse_and_head)
        for layer in self.layers:
            layer.step = torch.compile(layer.step)
            layer.history = torch.compile(layer.history)

    # ---- the model reports itself --------------------------------------------------------------
    def flops(self, L: int, M: int) -> dict[str, float]:
        """Forward FLOPs for one request with L history tokens per block and M candidates.

        paper: the paper's C ~ length x layers form, 2 x (dense ATL weights) x tokens x layers x
            blocks, attention scores neglected: 2 * K * N_L * (L + M) * (4 d^2 + 2 d f).
        exact: every matmul as executed by this config's attention path (2 FLOPs per
            multiply-add, as torch's FlopCounterMode counts): the ATL projections and FFN, the
            attention matmuls ((L+M)^2 for the joint reference, L^2 + M L split), BGF and head.
        per_candidate: exact / M.
        """
        cfg = self.cfg
        d, K, NL, f = cfg.d_model, cfg.n_blocks, cfg.n_layers, cfg.ffn_mult * cfg.d_model
        S = L + M
        dense_tok = 4 * d * d + 2 * d * f  # qkv + proj + fc1 + fc2 weights per token
        paper = 2 * K * NL * S * dense_tok
        att = S * S if cfg.attention == "joint" else L * L + M * L
        exact = K * NL * (2 * S * dense_tok + 2 * 2 * att * d)
        if cfg.bgf:
            r = max(1, K * d // cfg.se_reduction)
            exact += M * (2 * K * dense_tok + 2 * 2 * K * K * d + 2 * 2 * K * d * r)
        dims = _head_dims(cfg)
        exact += M * sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))
        return {"paper": float(paper), "exact": float(exact), "per_candidate": exact / M}


def _head_dims(cfg: ModelConfig) -> tuple[int, ...]:
    """Widths of the head MLP, input to logits: the fused block outputs (and c * E_k with
    `target_product`), plus the user side-feature vector."""
    width = (2 if cfg.target_product else 1) * cfg.n_blocks * cfg.d_model
    return (width + (cfg.d_model if cfg.user_feature_cards else 0), *cfg.head_hidden, len(cfg.tasks))


def make_model(cfg: ModelConfig) -> nn.Module:
    """Climber or one of the baselines, by `cfg.arch`; all share the batch format and the
    `param_counts` / `flops` reporting, so training and evaluation treat them alike."""
    if cfg.arch == "climber":
        return Climber(cfg)
    from climber.baselines import BASELINES

    return BASELINES[cfg.arch](cfg)
