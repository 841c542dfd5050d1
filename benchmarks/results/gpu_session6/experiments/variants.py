"""Scratch (not committed): A/B switches for the fused kernels, by env CLIMBER_AB."""
import os
import torch
import triton
import triton.language as tl
import climber.fused_attention as fa
from climber.fused_attention import _program, BLOCK


@triton.jit
def _bucket_sums(acc, ids, buckets, g, N: tl.constexpr):
    for n in tl.static_range(N):
        acc += tl.where(ids == n, tl.sum(tl.where(buckets == n, g, 0.0)), 0.0)
    return acc


@triton.jit
def _old_grad_kernel(G, PB, TB, DPOS, DTIM, H, L, P: tl.constexpr, T: tl.constexpr, PP: tl.constexpr,
                     TP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    bh, b, _, row0, rows = _program(H, BM)
    row_ok = rows < L
    p_ids, t_ids = tl.arange(0, PP), tl.arange(0, TP)
    acc_p = tl.zeros([PP], tl.float32)
    acc_t = tl.zeros([TP], tl.float32)
    for start in range(0, tl.minimum(row0 + BM, L), BN):
        cols = start + tl.arange(0, BN)
        ok = row_ok[:, None] & (cols[None, :] < L)
        idx = rows[:, None] * L + cols[None, :]
        g = tl.load(G + bh * L * L + idx, mask=ok, other=0.0).to(tl.float32)
        pb = tl.load(PB + idx, mask=ok, other=0)
        tb = tl.load(TB + b * L * L + idx, mask=ok, other=0)
        acc_p = _bucket_sums(acc_p, p_ids, pb, g, P)
        acc_t = _bucket_sums(acc_t, t_ids, tb, g, T)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    tl.store(DPOS + (bh * n_tiles + tile) * P + p_ids, acc_p, mask=p_ids < P)
    tl.store(DTIM + (bh * n_tiles + tile) * T + t_ids, acc_t, mask=t_ids < T)


def _old_backward(ctx, _, __):
    pb, tb = ctx.saved_tensors
    P, T = ctx.sizes
    g = ctx.grad.pop("dense", None)
    if g is None:
        return None, None, None, None, None, None
    BK, H, L, _ = g.shape
    n_tiles = triton.cdiv(L, BLOCK)
    dpos = torch.empty(BK * H, n_tiles, P, dtype=torch.float32, device=g.device)
    dtim = torch.empty(BK * H, n_tiles, T, dtype=torch.float32, device=g.device)
    _old_grad_kernel[(BK * H, n_tiles)](g, pb, tb, dpos, dtim, H, L, P=P, T=T, PP=triton.next_power_of_2(P),
                                        TP=triton.next_power_of_2(T), BM=BLOCK, BN=BLOCK, num_warps=4)
    return dpos.sum(1).view(BK, H, P), dtim.sum(1).view(BK, H, T), None, None, None, None


def apply(ab: str) -> None:
    if "oldtiles" in ab:
        fa.TILES["dkdv"] = (64, 64, 4, 2)
    if "oldgrad" in ab:
        fa._DenseBias.backward = staticmethod(_old_backward)
    print("AB variant:", ab or "final", fa.TILES, flush=True)


apply(os.environ.get("CLIMBER_AB", ""))
