"""The Climber ranking model (docs/paper.md section 2), in reading order.

1. Embeddings (`embeddings.py`, shared with the baselines): item id + item side features;
   history tokens add their action, their behaviour flags (one embedding per task and label)
   and scenario; candidate tokens add a target embedding and the request's scenario.
2. Multi-scale sequence extraction (MSE) happens in the data layer (`data/sumi.py`): each of
   the N_b = K strategies yields a sub-sequence, so inputs arrive as (B, K, L).
3. Adaptive Transformer Layers (ATL, `AdaptiveLayer`): K parallel homogeneous blocks with
   separate weights, stacked along a block dimension and run as one batched computation.
   Attention is softmax((Q K^T + f_b) / f_tc): f_tc a learned temperature per (layer, block,
   scenario, head) initialised at sqrt(d_head); f_b a bucketed relative position + time-gap
   bias per (block, scenario, head), shared by the layers of a block. The attention itself is
   a backend's (`climber/ops`: the plain-PyTorch reference, or Triton kernels), picked by the
   runtime (`climber/runtime.py`), not by the config: the model is the same math on either.
4. Block readout: the last layer's hidden state at each candidate token, E (B, M, K, d).
5. Bit-wise gating fusion (BGF): one ATL across the K block vectors (no bias, temperature
   from the scenario), then an element-wise squeeze-and-excitation gate.
6. Multi-task head: an MLP to one logit per task. Our additions, in the room docs/paper.md 5
   leaves for the readout (docs/design.md): softmax attention returns a convex mix of history
   values and is invariant to shifting a row's logits, so how strongly a candidate matches the
   history as a whole is normalised away, and an MLP learns products poorly. With
   `match_readout` the head also sees, per layer, block and head, the candidate's mean
   attention logit over the valid history keys, q . mean(k) / tau (exactly the shift the
   softmax discards), and their log-mean-exp (a soft maximum), computed from the keys a
   `HistoryCache` holds. With `pooled_readout` it also sees DLRM's interaction: the candidate
   embedding, each block's mean history embedding and the dot product of every pair of them
   (the cache carries each block's embedding sum). With `target_product` it sees c * E_k, the
   candidate embedding times each block output.

SUMI ("single user, multiple items", section 3.1): candidates are appended after the history;
history tokens never see candidates, and a candidate sees the history and itself. `forward`
(training and evaluation) runs that joint [history; candidates] sequence, one attention call per
layer. Serving splits it (section 3.2): `prefill` encodes the history once into a
`HistoryCache` (every layer's keys and values), `score` runs any number of candidates against
it, and `fold` adds new history events to it without recomputing the old ones, in the
same pass as a candidate pass or alone.
`forward(b) == score(prefill(b))` up to rounding (tests/test_model.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from climber import ops
from climber.config import ModelConfig
from climber.embeddings import Table, TokenEmbeddings
from climber.ops.reference import bias, match_readout, position_buckets, time_buckets


class BlockLinear(nn.Module):
    """K independent linear maps, no bias, one batched matmul over blocks-first rows.

    States are kept blocks first, (K, B * S, d), so each map is one plain bmm with no layout
    copies in or out. No bias (as PaLM and LLaMA): a bias's gradient is one more pass over the
    map's output per step, and fc1's bias made the GELU input a second stored activation beside
    the matmul's output (docs/design.md, "bias-free ATL")."""

    def __init__(self, k: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, d_in, d_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (K, N, d_in) -> (K, N, d_out)
        return torch.bmm(x, self.weight)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last axis without a gain. Before a linear map a gain g is redundant,
    norm(x) * g @ W = norm(x) @ (diag(g) W), and its gradient is a sum over every token per
    step, one more pass over the layer's states (docs/design.md, "bias-free ATL")."""
    return F.rms_norm(x, (x.shape[-1],))


class BlockRMSNorm(nn.Module):
    """RMSNorm with a gain per block: the stack's output norm (the ATL's own norms feed a linear
    map, which absorbs a gain, so they have none: `rms_norm`)."""

    def __init__(self, k: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k, 1, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (K, N, d): weight (K, 1, d)
        return rms_norm(x) * self.weight


class AdaptiveLayer(nn.Module):
    """One ATL for all K blocks at once: pre-norm attention and GELU FFN, each with a residual;
    bias-free maps and gain-free norms (`BlockLinear`, `rms_norm`). The attention between `qkv`
    and `forward` is the backend's (`Climber.encode`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        K, d = cfg.n_blocks, cfg.d_model
        self.qkv = BlockLinear(K, d, 3 * d)  # normed states (K, N, d) -> packed q, k, v (K, N, 3 d)
        self.proj = BlockLinear(K, d, d)
        self.fc1 = BlockLinear(K, d, cfg.ffn_mult * d)
        self.fc2 = BlockLinear(K, cfg.ffn_mult * d, d)
        self.act = nn.GELU(approximate="tanh")  # GELU's tanh form (docs/design.md)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything after the attention: states h (K, N, d) and the attention output y (B, K,
        H, S, dh), N = B * S -> (the next states, and their norm, the next layer's attention
        input). Ending on the next norm puts each state and every read of it in this one
        function: compiled (`climber/runtime.py`), the two parts of its gradient are summed
        inside one graph's backward, not by an eager add between graphs."""
        a = y.permute(1, 0, 3, 2, 4).reshape(h.shape)  # (K, B, S, H * dh); a view of the kernels' output
        h = h + self.drop(self.proj(a))
        h = h + self.drop(self.fc2(self.act(self.fc1(rms_norm(h)))))
        return h, rms_norm(h)


class BitwiseGatingFusion(nn.Module):
    """BGF: attention across the K block vectors, then a squeeze-and-excitation gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        K, d = cfg.n_blocks, cfg.d_model
        self.h = cfg.n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.ffn_mult * d), nn.Linear(cfg.ffn_mult * d, d)
        self.log_tau = nn.Parameter(torch.full((cfg.tau_scenarios, cfg.n_heads), math.log(math.sqrt(cfg.d_head))),
                                    requires_grad=cfg.adaptive)
        r = max(1, K * d // cfg.se_reduction)
        self.squeeze, self.excite = nn.Linear(K * d, r), nn.Linear(r, K * d)
        self.act = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, e: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        B, M, K, d = e.shape
        q, k, v = self.qkv(self.norm1(e)).view(B, M, K, 3, self.h, d // self.h).permute(3, 0, 1, 4, 2, 5)
        row = scenario if len(self.log_tau) > 1 else torch.zeros_like(scenario)  # one shared row: scenario_adaptive off
        tau = self.log_tau[row].exp()[:, None, :, None, None]  # (B, 1, H, 1, 1)
        a = torch.softmax((q @ k.transpose(-1, -2)).float() / tau, dim=-1).to(v.dtype) @ v  # (B, M, H, K, dh)
        g = e + self.drop(self.proj(a.transpose(2, 3).reshape(B, M, K, d)))
        g = g + self.drop(self.fc2(self.act(self.fc1(self.norm2(g)))))
        g = g.reshape(B, M, K * d)
        return g * torch.sigmoid(self.excite(F.relu(self.squeeze(g))))  # bit-wise gate


@dataclass
class HistoryCache:
    """The KV cache: what `prefill` returns and `score` and `fold` take. Each block's history
    is right-aligned (left-padded), so padding columns can be added or dropped on the left
    without changing any relative position."""

    kv: torch.Tensor  # (N_L, 2, B, K, H, L, dh): every layer's keys and values, one tensor (iterating
    # it yields each layer's (keys, values) pair, views): a copy, pad or cut of the cache is one op
    hist_mask: torch.Tensor  # (B, K, L)
    hist_time: torch.Tensor  # (B, K, L)
    scenario: torch.Tensor  # (B,) request scenario the cache was computed under
    user: torch.Tensor  # (B,)
    hist_sum: torch.Tensor  # (B, K, d) the sum of each block's history token embeddings (`pooled_readout`)

    @property
    def pooled(self) -> torch.Tensor:
        """Each block's mean history token embedding (B, K, d); zero for an empty block."""
        return self.hist_sum / self.hist_mask.sum(-1, keepdim=True).clamp(min=1)

    @property
    def nbytes(self) -> int:
        tensors = (self.kv, self.hist_mask, self.hist_time, self.scenario, self.user, self.hist_sum)
        return sum(t.numel() * t.element_size() for t in tensors)

    def pad_left(self, n: int) -> HistoryCache:
        """`n` more padding columns before every block's oldest token (masked out everywhere)."""
        if n == 0:
            return self

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([t.new_zeros(*t.shape[:dim], n, *t.shape[dim:][1:]), t], dim=dim)

        return HistoryCache(pad(self.kv, -2), pad(self.hist_mask, -1), pad(self.hist_time, -1), self.scenario,
                            self.user, self.hist_sum)

    def last(self, n: int) -> HistoryCache:
        """Every block's last `n` columns: leading columns dropped (views; they must be padding, as
        they are when no block holds more than `n` tokens), or padding added when it has fewer."""
        L = self.hist_mask.shape[-1]
        if n >= L:
            return self.pad_left(n - L)
        return HistoryCache(self.kv[..., L - n:, :], self.hist_mask[..., L - n:], self.hist_time[..., L - n:],
                            self.scenario, self.user, self.hist_sum)

    @staticmethod
    def stack(caches: list[HistoryCache]) -> HistoryCache:
        """One batch from several caches, each left-padded to the longest history."""
        if len(caches) == 1:
            return caches[0]
        L = max(c.hist_mask.shape[-1] for c in caches)
        cs = [c.pad_left(L - c.hist_mask.shape[-1]) for c in caches]
        rest = [torch.cat([getattr(c, f) for c in cs]) for f in ("hist_mask", "hist_time", "scenario", "user",
                                                                  "hist_sum")]
        return HistoryCache(torch.cat([c.kv for c in cs], dim=2), *rest)

    def replace_blocks(self, other: HistoryCache, blocks: torch.Tensor) -> HistoryCache:
        """This cache with the blocks where `blocks` (B, K) is set taken from `other` (same
        requests, e.g. a fresh prefill of those blocks), both padded to the longer history."""
        L = max(self.hist_mask.shape[-1], other.hist_mask.shape[-1])
        a, b = self.pad_left(L - self.hist_mask.shape[-1]), other.pad_left(L - other.hist_mask.shape[-1])
        m3 = blocks[..., None]
        return HistoryCache(torch.where(blocks[..., None, None, None], b.kv, a.kv),
                            torch.where(m3, b.hist_mask, a.hist_mask), torch.where(m3, b.hist_time, a.hist_time),
                            a.scenario, a.user, torch.where(m3, b.hist_sum, a.hist_sum))

    def row(self, i: int) -> HistoryCache:
        """Request i's cache alone, a copy (a view would keep the whole batch's tensors alive)."""
        return HistoryCache(self.kv[:, :, i:i + 1].clone(), *(getattr(self, f)[i:i + 1].clone() for f in
                                                              ("hist_mask", "hist_time", "scenario", "user",
                                                               "hist_sum")))


def _heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed (K, B, S, 3, H, dh) -> q, k, v (B, K, H, S, dh), views."""
    return qkv.permute(3, 1, 0, 4, 2, 5).unbind(0)


def _stack_kv(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-layer (keys, values) pairs, (B, K, H, L, dh) each -> one (N_L, 2, B, K, H, L, dh) tensor."""
    return torch.stack([t for pair in kv for t in pair]).unflatten(0, (len(kv), 2))


def _match_features(match: list[torch.Tensor]) -> torch.Tensor | None:
    """Per-layer match readouts [(B, K, H, M, 2)] -> the head's extra inputs (B, M, N_L * K * H * 2)."""
    if not match:
        return None
    m = torch.stack(match)  # (N_L, B, K, H, M, 2)
    return m.permute(1, 4, 0, 2, 3, 5).reshape(m.shape[1], m.shape[4], -1)


def _pooled_features(c: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The pooled readout, DLRM's interaction (climber/baselines/dlrm.py) read out beside the
    blocks: candidate embeddings c (B, M, d) and each block's mean history embedding (B, K, d)
    -> (B, M, F d + F (F - 1) / 2), F = K + 1: the fields [c, pooled_1 .. pooled_K] and the dot
    product of every pair of them."""
    B, M, _ = c.shape
    x = torch.cat([c[:, :, None], pooled[:, None].expand(B, M, -1, -1).to(c.dtype)], 2)  # (B, M, F, d)
    i, j = torch.tril_indices(x.shape[2], x.shape[2], offset=-1, device=c.device)
    return torch.cat([x.flatten(2), (x @ x.transpose(-1, -2))[:, :, i, j]], -1)


def _buckets(t: torch.Tensor, n_hist: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """f_b's bucket ids for a sequence with token times t (B, K, S), the first n_hist history and
    the rest candidates, all at position n_hist: position buckets (S, S), time buckets (B, K, S, S)
    int16 (query minus key)."""
    i = torch.arange(t.shape[-1], device=t.device).clamp(max=n_hist)
    pb = position_buckets(i[:, None] - i[None, :], cfg.pos_buckets)
    return pb, time_buckets(t[..., :, None] - t[..., None, :], cfg.time_buckets).to(torch.int16)


class Climber(TokenEmbeddings):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)  # 1. embeddings, shared by all blocks (climber/embeddings.py)
        d, K, H, T = cfg.d_model, cfg.n_blocks, cfg.n_heads, len(cfg.tasks)
        # 3. ATL stack; adaptive tables are indexed [block, scenario, head, bucket]
        tables = (K, cfg.tau_scenarios) if cfg.adaptive else (1, 1)
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
        # set by the runtime (climber/runtime.py), not saved: the attention backend, and the dtype
        # of the residual stream (None: the embeddings'; bf16 under autocast halves its traffic)
        self.attention: ops.Attention = ops.REFERENCE
        self.stream_dtype: torch.dtype | None = None

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Embedding) and not isinstance(m, Table):  # a Table inits itself, by row blocks
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    # ---- 3. adaptive attention parameters -----------------------------------------------------
    def _table_scenario(self, scenario: torch.Tensor) -> torch.Tensor:
        """Each request's row of the scenario axis: its scenario, or 0 where that axis is shared."""
        adaptive = self.cfg.adaptive and self.cfg.scenario_adaptive
        return scenario if adaptive else torch.zeros_like(scenario)

    def _tables(self, scenario: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_b's tables for each request: position (B, K, H, P) and time (B, K, H, T)."""
        s = self._table_scenario(scenario)
        K = self.cfg.n_blocks
        return tuple(t[:, s].transpose(0, 1).expand(-1, K, -1, -1) for t in (self.pos_bias, self.time_bias))

    def _inv_tau(self, scenario: torch.Tensor) -> torch.Tensor:
        """1 / f_tc(layer, block, scenario, head) for each request: (N_L, B, K, H), fp32."""
        s = self._table_scenario(scenario)
        inv = (-self.log_tau[:, :, s]).exp().transpose(1, 2)  # (N_L, B, K or 1, H)
        return inv.expand(-1, -1, self.cfg.n_blocks, -1)

    # ---- the ATL stack over a sequence, and over new tokens against a cache ---------------------
    def encode(self, x, valid, pb, tb, inv_tau, n_hist: int, scenario, keep_kv: bool = False):
        """The ATL stack over a SUMI sequence: states x (K, B, S, d), blocks first; key validity
        (B, K, S); f_b's bucket ids pb (S, S) and tb (B, K, S, S) (`_buckets`); 1 / tau (N_L, B,
        K, H); the first n_hist tokens history, the rest candidates -> (the candidates' final
        states (K, B, S - n_hist, d), each layer's keys and values (B, K, H, S, dh) if keep_kv,
        the match readout's features (B, S - n_hist, N_L * K * H * 2) or None). f_b and the mask
        are prepared once, by the attention backend, for all layers.

        The last layer's history rows feed nothing: past its attention only the candidates' rows
        go on (its output projection and FFN on M tokens, not S), and with no candidates
        (prefill) its keys and values are all that is computed. The split path this replaced
        skipped the same work; without it a CPU training step cost about 15 % more."""
        K, B, S, d = x.shape
        H, N_L = self.cfg.n_heads, len(self.layers)
        h = x.reshape(K, B * S, d)
        n = rms_norm(h)
        seq, kv, match = None, [], []
        for i, (layer, inv) in enumerate(zip(self.layers, inv_tau)):
            qkv = layer.qkv(n).view(K, B, S, 3, H, d // H)
            if keep_kv:
                kv.append(_heads(qkv)[1:])
            last = i == N_L - 1
            if last and n_hist == S:
                return x.new_zeros(K, B, 0, d), kv, None
            if self.cfg.match_readout:
                q, k, _ = _heads(qkv)
                match.append(match_readout(q[..., n_hist:, :], k[..., :n_hist, :], valid[..., :n_hist],
                                           inv[..., None, None]))
            if seq is None:  # f_b in the projections' dtype (the compute dtype under autocast)
                seq = self.attention.prepare(*self._tables(scenario), pb, tb, valid, n_hist, qkv.dtype)
            y, seq = self.attention.attend(qkv, inv, seq)
            if last:  # the candidates' rows only
                h = h.view(K, B, S, d)[:, :, n_hist:].reshape(K, -1, d)
                y = y[..., n_hist:, :]
            h, n = layer(h, y)
        return h.view(K, B, S - n_hist, d), kv, _match_features(match)

    def _through_cache(self, cache: HistoryCache, x: torch.Tensor | None, t: torch.Tensor | None,
                       new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """Tokens through every layer against the cache, in one pass.

        x (K, B, M, d) or None: candidates at request time t (B,), each at the position after the
        newest history token, seeing the valid history and itself. new = (states (K, B, n, d),
        validity (B, K, n), times (B, K, n)) or None: new history tokens, right-aligned per block
        (padding rows first), each at the position after the one before it, seeing the valid
        cached tokens, the valid new tokens up to itself, and itself; the candidates see them too.
        Both kinds attend in one backend call per layer, `attend_cached`, the new tokens' keys and
        values beside the cache's, not concatenated to them.
        -> (the candidates' final states (K, B, M, d) or None, the new tokens' keys and values per
        layer [(B, K, H, n, dh)], the match readout's features (B, M, N_L * K * H * 2) or None,
        and the keys' validity and times (B, K, L + n) after the new tokens)."""
        B, K, L = cache.hist_mask.shape
        H, dh, dev = self.cfg.n_heads, self.cfg.d_head, cache.hist_mask.device
        P, T = self.cfg.pos_buckets, self.cfg.time_buckets
        pos, tim = self._tables(cache.scenario)
        valid, times, n = cache.hist_mask, cache.hist_time, 0
        cand_pos = torch.full((1,), L, device=dev)  # the candidates' position, keys' positions 0 .. L - 1
        key_pos = torch.arange(L, device=dev)
        states = [] if x is None else [x]
        new_bias = cand_bias = self_bias = None  # f_b of the new tokens' rows, the candidates' row, their own key
        if new is not None:
            xn, new_valid, new_time = new
            n = xn.shape[2]
            valid, times = torch.cat([valid, new_valid], -1), torch.cat([times, new_time], -1)
            new_pos = L + torch.arange(n, device=dev) - (n - new_valid.sum(-1, keepdim=True))  # (B, K, n)
            key_pos = torch.cat([key_pos.expand(B, K, L), new_pos], -1)  # (B, K, L + n)
            cand_pos = new_pos[..., -1:] + 1
            new_bias = bias(pos, tim, position_buckets(new_pos[..., :, None] - key_pos[..., None, :], P),
                            time_buckets(new_time[..., :, None] - times[..., None, :], T))  # (B, K, H, n, L + n)
            states = [xn, *states]
        M = 0 if x is None else x.shape[2]
        if M:
            cand_bias = bias(pos, tim, position_buckets(cand_pos[..., None] - key_pos[..., None, :], P),
                             time_buckets(t[:, None, None, None] - times[:, :, None], T))  # (B, K, H, 1, L + n)
            zero = torch.zeros(1, 1, dtype=torch.long, device=dev)
            self_bias = bias(pos, tim, zero, zero.expand(B, K, 1, 1))  # (B, K, H, 1, 1)
        S = n + M
        h = (states[0] if len(states) == 1 else torch.cat(states, 2)).reshape(K, B * S, -1)
        norm = rms_norm(h)
        new_kv, match = [], []
        for i, (layer, inv, (k_hist, v_hist)) in enumerate(zip(self.layers, self._inv_tau(cache.scenario), cache.kv,
                                                               strict=True)):
            q, k, v = _heads(layer.qkv(norm).view(K, B, S, 3, H, dh))
            if n:
                new_kv.append((k[..., :n, :], v[..., :n, :]))
                if not M and i == len(self.layers) - 1:
                    break  # only the new tokens' keys and values are wanted
            y, m = self.attention.attend_cached(q, k, v, inv[..., None, None], k_hist, v_hist, cand_bias, self_bias,
                                                valid, self.cfg.match_readout and M > 0, new_bias)
            if m is not None:
                match.append(m)
            h, norm = layer(h, y)
        out = h.view(K, B, S, -1)[:, :, n:] if M else None
        return out, new_kv, _match_features(match), valid, times

    # ---- 4-6. block readout, fusion and head ---------------------------------------------------
    def readout(self, h: torch.Tensor, c: torch.Tensor, scenario: torch.Tensor, user: torch.Tensor,
                match: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        """Last-layer states at the candidates h (K, B, M, d), candidate embeddings c (B, M, d),
        the match readout's features (B, M, N_L * K * H * 2) or None and each block's mean
        history embedding (B, K, d) -> logits (B, M, T)."""
        K, B, M, d = h.shape
        e = self.norm_out(h.reshape(K, B * M, d)).view(K, B, M, d).permute(1, 2, 0, 3)  # (B, M, K, d)
        return self.fuse_and_head(e.contiguous(), c, scenario, user, match, pooled)

    def fuse_and_head(self, e: torch.Tensor, c: torch.Tensor, scenario: torch.Tensor, user: torch.Tensor,
                      match: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        """Block outputs e (B, M, K, d), candidate embeddings c (B, M, d), match features or None,
        mean history embeddings (B, K, d) -> logits (B, M, T)."""
        B, M, K, d = e.shape
        y = self.bgf(e, scenario) if self.bgf is not None else e.reshape(B, M, K * d)
        if self.cfg.target_product:  # c * E_k: how well the candidate matches each block's readout
            y = torch.cat([y, (c[:, :, None].to(e.dtype) * e).reshape(B, M, K * d)], dim=-1)
        if match is not None:
            y = torch.cat([y, match.to(y.dtype)], dim=-1)
        if self.cfg.pooled_readout:
            y = torch.cat([y, _pooled_features(c, pooled).to(y.dtype)], dim=-1)
        return self.head(self.with_user(y, user))

    # ---- SUMI training and evaluation: the joint [history; candidates] sequence ----------------
    def front(self, b: dict):
        """`encode`'s inputs for the joint sequence, candidates from position L on at the request's
        time: states x (K, B, L + M, d), key validity (B, K, L + M), f_b's bucket ids, every
        layer's 1 / tau; the candidate embeddings c0 (B, M, d) and each block's mean history
        embedding (B, K, d). One region for the runtime to compile: eager, the embedding sums,
        the sequence's copy and the (B, K, S, S) time buckets are some 20 memory-bound kernels."""
        h = self.embed_history(b)  # (B, K, L, d)
        m = b["hist_mask"][..., None].to(h.dtype)
        pooled = (h * m).sum(2) / m.sum(2).clamp(min=1)
        B, K, _, _ = h.shape
        M = b["cand_item"].shape[1]
        c0 = self.embed_candidates(b["cand_item"], b["req_scenario"])
        x = torch.cat([h.transpose(0, 1), c0[None].expand(K, -1, -1, -1)], dim=2)
        if self.stream_dtype is not None:
            x = x.to(self.stream_dtype)
        valid = torch.cat([b["hist_mask"], b["cand_mask"][:, None].expand(B, K, M)], dim=-1)
        t = torch.cat([b["hist_time"], b["req_time"][:, None, None].expand(B, K, M)], dim=-1)
        inputs = (x, valid, *_buckets(t, b["hist_item"].shape[-1], self.cfg), self._inv_tau(b["req_scenario"]))
        return inputs, c0, pooled

    def forward(self, b: dict) -> torch.Tensor:
        """Batch of SUMI samples -> logits (B, M, T)."""
        inputs, c0, pooled = self.front(b)
        L = b["hist_item"].shape[-1]
        h, _, match = self.encode(*inputs, L, b["req_scenario"])
        return self.readout(h, c0, b["req_scenario"], b["user"], match, pooled)

    # ---- SUMI serving: prefill the history once, score candidates, fold new events in ---------
    def prefill(self, b: dict) -> HistoryCache:
        """Encode the history (hist_* (B, K, L), req_scenario, user) through every layer of every
        block; keep each layer's keys and values."""
        e = self.embed_history(b)  # (B, K, L, d)
        x = e.transpose(0, 1).contiguous()
        L, s = x.shape[2], b["req_scenario"]
        _, kv, _ = self.encode(x, b["hist_mask"], *_buckets(b["hist_time"], L, self.cfg), self._inv_tau(s), L, s,
                               keep_kv=True)
        hist_sum = (e * b["hist_mask"][..., None].to(e.dtype)).sum(2)
        return HistoryCache(_stack_kv(kv), b["hist_mask"], b["hist_time"], b["req_scenario"], b["user"], hist_sum)

    def score(self, cache: HistoryCache, cand_item: torch.Tensor, req_time: torch.Tensor) -> torch.Tensor:
        """Logits (B, M, T) for candidates (B, M) at request times (B,) against a prefilled history."""
        K = self.cfg.n_blocks
        c0 = self.embed_candidates(cand_item, cache.scenario)  # (B, M, d)
        h, _, match, _, _ = self._through_cache(cache, c0[None].expand(K, -1, -1, -1), req_time)
        return self.readout(h, c0, cache.scenario, cache.user, match, cache.pooled)

    def fold(self, cache: HistoryCache, new: dict, reset: torch.Tensor, cand_item: torch.Tensor | None = None,
             req_time: torch.Tensor | None = None) -> tuple[torch.Tensor | None, HistoryCache]:
        """Fold new history events into the cache, and score candidates against the result in the
        same pass (`cand_item` (B, M) at `req_time` (B,)), or not (None).

        `new`: hist_* of shape (B, K, n), each block's new events last (right-aligned, padding
        rows first, `hist_mask` marking the events); `reset` (B, K): blocks whose cached tokens are
        dropped first (a window that overflowed: `new` then holds the block's whole window). Each
        new token runs through every layer against the cached tokens, the new ones before it and
        itself: exactly its row in a prefill from scratch, since history attention is causal and
        positions enter only relative to the query. -> (logits (B, M, T) or None, the cache with n
        more columns, each block right-aligned again; the caller drops the columns no block
        needs, `HistoryCache.last`). No shape or branch depends on the data, so a CUDA graph can
        capture it. `fold(cache, new, reset, c, t)[0] == score(fold(cache, new, reset)[1], c, t)`."""
        cache = dataclasses.replace(cache, hist_mask=cache.hist_mask & ~reset[..., None])
        e = self.embed_history(new)  # (B, K, n, d)
        c0 = x = None
        if cand_item is not None:
            c0 = self.embed_candidates(cand_item, cache.scenario)
            x = c0[None].expand(self.cfg.n_blocks, -1, -1, -1)
        h, new_kv, match, valid, times = self._through_cache(cache, x, req_time,
                                                             (e.transpose(0, 1), new["hist_mask"], new["hist_time"]))
        added = (e * new["hist_mask"][..., None].to(e.dtype)).sum(2).to(cache.hist_sum.dtype)
        hist_sum = torch.where(reset[..., None], added, cache.hist_sum + added)
        kv = torch.cat([cache.kv, _stack_kv(new_kv)], -2)
        order = torch.argsort(valid.to(torch.int32), dim=-1, stable=True)  # padding first, tokens in order
        kv = kv.gather(-2, order[None, None, :, :, None, :, None].expand_as(kv))
        folded = HistoryCache(kv, valid.gather(-1, order), times.gather(-1, order), cache.scenario, cache.user,
                              hist_sum)
        if h is None:
            return None, folded
        return self.readout(h, c0, cache.scenario, cache.user, match, folded.pooled), folded

    # ---- the model reports itself --------------------------------------------------------------
    def flops(self, L: int, M: int) -> dict[str, float]:
        """Forward FLOPs for one request with L history tokens per block and M candidates.

        paper: the paper's C ~ length x layers form, 2 x (dense ATL weights) x tokens x layers x
            blocks, attention scores neglected: 2 * K * N_L * (L + M) * (4 d^2 + 2 d f).
        exact: every matmul of `forward` on the reference backend (2 FLOPs per multiply-add,
            as torch's FlopCounterMode counts): the ATL projections and FFN (the last layer's
            output projection and FFN on the M candidates only), the attention matmuls (L^2 for
            the history rows, M L for the candidates' rows; their own key is an elementwise
            product), BGF and head. The Triton kernels skip the masked half of the L^2 scores.
        per_candidate: exact / M.
        """
        cfg = self.cfg
        d, K, NL, f = cfg.d_model, cfg.n_blocks, cfg.n_layers, cfg.ffn_mult * cfg.d_model
        S = L + M
        dense_tok = 4 * d * d + 2 * d * f  # qkv + proj + fc1 + fc2 weights per token
        paper = 2 * K * NL * S * dense_tok
        last_rows = 2 * L * (d * d + 2 * d * f)  # the last layer's history rows past its attention
        exact = K * (NL * (2 * S * dense_tok + 2 * 2 * (L * L + M * L) * d) - last_rows)
        if cfg.bgf:
            r = max(1, K * d // cfg.se_reduction)
            exact += M * (2 * K * dense_tok + 2 * 2 * K * K * d + 2 * 2 * K * d * r)
        if cfg.match_readout:  # the candidates' logits against the history keys, per block and layer
            exact += K * NL * 2 * M * L * d
        if cfg.pooled_readout:  # the F x F Gram matrix of the fields [c, pooled_1 .. pooled_K]
            exact += M * 2 * (K + 1) ** 2 * d
        dims = _head_dims(cfg)
        exact += M * sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))
        return {"paper": float(paper), "exact": float(exact), "per_candidate": exact / M}


def _head_dims(cfg: ModelConfig) -> tuple[int, ...]:
    """Widths of the head MLP, input to logits: the fused block outputs (and c * E_k with
    `target_product`, the mean logits with `match_readout`), plus the user side-feature vector."""
    width = (2 if cfg.target_product else 1) * cfg.n_blocks * cfg.d_model
    width += 2 * cfg.n_layers * cfg.n_blocks * cfg.n_heads if cfg.match_readout else 0
    n = cfg.n_blocks + 1  # pooled readout: the fields [c, pooled_1 .. pooled_K] and their pairwise dots
    width += n * cfg.d_model + n * (n - 1) // 2 if cfg.pooled_readout else 0
    return (width + (cfg.d_model if cfg.user_feature_cards else 0), *cfg.head_hidden, len(cfg.tasks))


def make_model(cfg: ModelConfig) -> nn.Module:
    """Climber or one of the baselines, by `cfg.arch`; all share the batch format and the
    `param_counts` / `flops` reporting, so training and evaluation treat them alike."""
    if cfg.arch == "climber":
        return Climber(cfg)
    from climber.baselines import BASELINES

    return BASELINES[cfg.arch](cfg)
