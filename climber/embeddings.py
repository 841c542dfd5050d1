"""Token embeddings shared by Climber and every baseline (docs/paper.md section 2, input layer).

An item is its id embedding plus its side-feature embeddings; a history token adds its action,
its behaviour flags (one embedding per task and label: what the user did with the item) and
its scenario; a candidate adds a learned target embedding and the request's scenario. User
side features are embedded per field. The side-feature lookup tables are buffers, so they
travel with the weights and serving needs only ids. Sharing this module is what lets a
comparison isolate the architecture.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from climber.config import ModelConfig

SMALL_TABLE = 256  # `lookup`: tables of at most this many rows get their gradient by a matmul
INIT_STD = 0.02  # every embedding's init: N(0, 0.02)
INIT_BLOCK = 8192  # a `Table`'s rows are drawn a block of this many at a time, each block from its own generator

_META_TABLES: ContextVar[bool] = ContextVar("meta_tables", default=False)


@contextmanager
def meta_tables():
    """Build the `Table`s of more than SMALL_TABLE rows on the meta device: no memory and no
    values, only their shape and init seed, for a runtime that then materialises a block of rows
    of each (`Table.init_rows`) without the table ever being whole. Everything else is built as
    outside, drawing the same numbers from the global RNG."""
    token = _META_TABLES.set(True)
    try:
        yield
    finally:
        _META_TABLES.reset(token)


def embed_features(codes: torch.Tensor, tables: nn.ModuleList, widths: tuple[int, ...]) -> list[torch.Tensor]:
    """Side-feature codes (..., sum(widths)) -> one (..., d) embedding per feature: a one-column
    feature's row, a bag's mean over its non-zero codes (`Table.bag_mean`)."""
    out, col = [], 0
    for emb, w in zip(tables, widths, strict=True):
        x = codes[..., col:col + w]
        col += w
        out.append(emb(x[..., 0]) if w == 1 else emb.bag_mean(x))
    return out


def lookup(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.embedding(ids, weight)`, whose gradient, for a small table, is one matmul.

    A lookup's backward adds each token's gradient into its row. With a few rows (actions,
    behaviour flags, scenarios, small side features) every token's adds go to the same rows
    and serialise on atomics (about 1.9 ms a step at the paper config on an H200, where
    inductor compiles them as atomic adds; docs/performance.md); one-hot(ids)^T @ grad, a (rows,
    tokens) by (tokens, d) GEMM, does the same sums at once, deterministically."""
    if len(weight) > SMALL_TABLE:
        return F.embedding(ids, weight)
    return _SmallLookup.apply(ids, weight)


class _SmallLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.rows, ctx.dtype = len(weight), weight.dtype
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        rows = ctx.rows + -ctx.rows % 16  # whole 16-row tiles for the tensor cores
        hot = (ids.reshape(-1, 1) == torch.arange(rows, device=ids.device)).to(grad.dtype)  # (tokens, rows)
        return None, (hot.T @ grad.reshape(-1, grad.shape[-1]))[: ctx.rows].to(ctx.dtype)


class Table(nn.Embedding):
    """An id table of the vocabulary (items, side features), read only through its two methods:
    a row per id, and a bag's mean. Nothing else reads its weight, so a data-parallel runtime
    may swap a large one for a table whose rows are split over the ranks, with the same methods
    (`climber/distributed.py`); this file stays the math.

    Its init, N(0, INIT_STD) on every row (the padding row too: it is never trained), is a pure
    function of its rows: the table draws one seed from the global RNG when built (in the
    model's construction order, so a seeded model is reproducible), and block b of INIT_BLOCK
    rows is drawn on the CPU by a generator seeded with (that seed, b). Any range of rows can
    then be made alone (`init_rows`), equal to those rows of the whole table, on any device and
    for any split over ranks; and the table's values take nothing else from the global RNG, so
    the rest of the model is the same whether a table was built whole or on the meta device
    (`meta_tables`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, device="meta")  # no memory, no draws
        self.init_seed = int(torch.randint(2**62, (), device="cpu"))
        deferred = torch.get_default_device().type == "meta" or (_META_TABLES.get() and num_embeddings > SMALL_TABLE)
        if not deferred:
            self.weight = nn.Parameter(self.init_rows(0, num_embeddings))

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":  # nn.Embedding calls it before the seed exists, on meta
            with torch.no_grad():
                self.weight.copy_(self.init_rows(0, self.num_embeddings))

    def init_rows(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows [start, stop) of the table's init, (stop - start, d) on `device`: the same numbers
        whatever the range and the device (drawn on the CPU a block at a time, so the host holds
        at most one block beyond the result)."""
        out = torch.empty(stop - start, self.embedding_dim, device=device)
        for b in range(start // INIT_BLOCK, -(-stop // INIT_BLOCK)):
            lo, hi = b * INIT_BLOCK, min((b + 1) * INIT_BLOCK, self.num_embeddings)
            seed = int(np.random.SeedSequence([self.init_seed, b]).generate_state(1, np.uint64)[0] >> 1)
            block = torch.empty(hi - lo, self.embedding_dim, device="cpu").normal_(0.0, INIT_STD,
                                                                     generator=torch.Generator().manual_seed(seed))
            a, z = max(lo, start), min(hi, stop)
            out[a - start:z - start].copy_(block[a - lo:z - lo])
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., d)
        if self.padding_idx is not None:  # the item table: row 0 (padding) gets no gradient
            return F.embedding(ids, self.weight, self.padding_idx)
        return lookup(ids, self.weight)

    def bag_mean(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (..., w) -> (..., d): the mean of the rows of the non-zero codes (zero for an
        empty bag), by `F.embedding_bag`, which never materialises the (..., w, d) rows."""
        bag = F.embedding_bag(codes.reshape(-1, codes.shape[-1]), self.weight, mode="mean", padding_idx=0)
        return bag.view(*codes.shape[:-1], -1)


class TokenEmbeddings(nn.Module):
    """Base class: the embedding tables, side-feature buffers, and `param_counts`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, T = cfg.d_model, len(cfg.tasks)
        self.item_emb = Table(cfg.n_items, d, padding_idx=0)
        self.item_feat_emb = nn.ModuleList(Table(c, d) for c in cfg.item_feature_cards)
        self.user_feat_emb = nn.ModuleList(Table(c, d) for c in cfg.user_feature_cards)
        self.action_emb = nn.Embedding(cfg.n_actions, d)
        self.flag_emb = nn.Embedding(2 * T, d)  # index 2t + label_t
        self.scenario_emb = nn.Embedding(cfg.n_scenarios, d)
        self.target_emb = nn.Parameter(torch.zeros(d))
        self.item_widths = cfg.item_feature_widths or (1,) * len(cfg.item_feature_cards)
        self.user_widths = cfg.user_feature_widths or (1,) * len(cfg.user_feature_cards)
        self.register_buffer("item_features", torch.zeros(cfg.n_items, sum(self.item_widths), dtype=torch.long))
        self.register_buffer("user_features", torch.zeros(cfg.n_users, sum(self.user_widths), dtype=torch.long))

    def embed_items(self, item: torch.Tensor) -> torch.Tensor:  # (...) -> (..., d)
        e = self.item_emb(item)
        for f in embed_features(self.item_features[item], self.item_feat_emb, self.item_widths):
            e = e + f
        return e

    def embed_history(self, b: dict) -> torch.Tensor:
        """History tokens (B, [K,] L, d) from hist_* of shape (B, [K,] L): the item plus its
        action, one flag per task and its scenario, three small tables looked up as one."""
        T = len(self.cfg.tasks)
        na, nf = self.cfg.n_actions, 2 * T
        flags = b["hist_labels"] + 2 * torch.arange(T, device=b["hist_labels"].device)
        rows = torch.cat([b["hist_action"][..., None], flags + na, b["hist_scenario"][..., None] + na + nf], -1)
        events = torch.cat([self.action_emb.weight, self.flag_emb.weight, self.scenario_emb.weight])
        return self.embed_items(b["hist_item"]) + lookup(rows, events).sum(-2)

    def embed_candidates(self, item: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        """Candidate tokens (B, M, d) for items (B, M) of requests in `scenario` (B,)."""
        return self.embed_items(item) + self.target_emb + self.scenario_emb(scenario)[:, None]

    def user_fields(self, user: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, F_u, d): one embedding per user side feature."""
        fields = embed_features(self.user_features[user], self.user_feat_emb, self.user_widths)
        if not fields:
            return user.new_zeros(len(user), 0, self.cfg.d_model, dtype=self.item_emb.weight.dtype)
        return torch.stack(fields, 1)

    def with_user(self, y: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """Append the summed user side-feature vector to every candidate's (B, M, n) head input."""
        if not self.cfg.user_feature_cards:
            return y
        u = self.user_fields(user).sum(1)  # (B, d)
        return torch.cat([y, u[:, None].expand(*y.shape[:2], -1).to(y.dtype)], dim=-1)

    def param_counts(self) -> dict[str, int]:
        emb = sum(p.numel() for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"embedding": emb, "dense": total - emb, "total": total}
