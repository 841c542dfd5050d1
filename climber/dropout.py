"""Dropout for the fused GPU training pass (issue 5): keep masks from 16-bit random numbers,
eight of them from each Philox call.

Inductor's dropout draws one Philox-4x32-10 block per element and uses one of its four words:
at the paper config (4 blocks x 128 requests x 208 tokens x d 512, two dropouts a layer, 12
layers) that integer work took about 5 ms of a 102 ms step on an H200 (the step ran in 97 ms
without dropout; `benchmarks/results/gpu_session6/`). Here one Triton kernel turns each Philox
block into eight uniform 16-bit numbers (a write of 2 bytes an element), and the compiled
region compares them with a threshold inside the kernel that consumes the mask. The drop
probability is rounded to a multiple of 1/65536 (0.1 -> 0.100006).

`random_bits` is a custom op, opaque to torch.compile, and its seed is drawn in the graph from
torch's generator, so runs stay reproducible under `torch.manual_seed`. Off the fused path (CPU,
the split and joint paths, the fusion module and the head) the model uses `nn.Dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from climber import fused_attention

triton = fused_attention.triton
if triton is not None:
    import triton.language as tl

BLOCK = 1024  # Philox calls per program; each gives four 32-bit words (eight 16-bit numbers)


@torch.library.custom_op("climber::random_bits", mutates_args=())
def random_bits(shape: list[int], seed: torch.Tensor) -> torch.Tensor:
    """Uniform random int16 of `shape` on seed's device, a function of seed ((1,) int64)."""
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 1) // 2, dtype=torch.int32, device=seed.device)
    _bits_kernel[(triton.cdiv(words.numel(), 4 * BLOCK),)](seed, words, words.numel(), BLOCK=BLOCK)
    return words.view(torch.int16)[:n].view(shape)


@random_bits.register_fake
def _(shape, seed):
    return seed.new_empty(shape, dtype=torch.int16)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training), with the mask from `random_bits` where the Triton kernels run."""
    if not training or p == 0.0:
        return x
    if not fused_attention.available(x.device):
        return F.dropout(x, p, True)
    cut = round(p * 65536)  # dropped: the bits' 16-bit value is below cut (as signed: cut - 32768)
    seed = torch.randint(0, 2**62, (1,), device=x.device)
    keep = random_bits(list(x.shape), seed) >= cut - 32768
    return x * keep * (65536 / (65536 - cut))


if triton is not None:

    @triton.jit
    def _bits_kernel(SEED, OUT, n_words, BLOCK: tl.constexpr):
        """Words 4 i .. 4 i + 3 of OUT are Philox(seed, counter i)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(tl.load(SEED), i)
        w = 4 * i
        tl.store(OUT + w, r0.to(tl.int32, bitcast=True), mask=w < n_words)
        tl.store(OUT + w + 1, r1.to(tl.int32, bitcast=True), mask=w + 1 < n_words)
        tl.store(OUT + w + 2, r2.to(tl.int32, bitcast=True), mask=w + 2 < n_words)
        tl.store(OUT + w + 3, r3.to(tl.int32, bitcast=True), mask=w + 3 < n_words)
