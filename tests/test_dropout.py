"""The fused training pass's dropout (climber/dropout.py): its random numbers and masks, eager
and compiled. On CPU the Triton kernel runs in Triton's interpreter (conftest)."""

from __future__ import annotations

import pytest
import torch

from climber import dropout as fd
from climber import fused_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not fused_attention.available(torch.device(DEVICE)),
                                  reason="needs a GPU or Triton's CPU interpreter")


def kept_scale(p: float) -> float:
    cut = round(p * 65536)
    return 65536 / (65536 - cut)


@needs_kernel
def test_random_bits_are_a_function_of_the_seed_and_uniform():
    seed = torch.tensor([2024], device=DEVICE)
    bits = fd.random_bits([251, 257], seed)  # odd count: the last 32-bit word is half used
    assert bits.shape == (251, 257) and bits.dtype == torch.int16
    assert torch.equal(bits, fd.random_bits([251, 257], seed))
    other = fd.random_bits([251, 257], torch.tensor([2025], device=DEVICE))
    assert (bits != other).float().mean() > 0.99
    # each sixteenth of the 16-bit range holds about n / 16 of the numbers (+- 8 %, > 6 sd)
    counts = torch.bincount(((bits.int() + 32768) // 4096).flatten().cpu(), minlength=16).float()
    assert counts.numel() == 16
    assert (counts / (bits.numel() / 16) - 1).abs().max() < 0.08


@needs_kernel
@pytest.mark.parametrize("compiled", [False, True])
def test_dropout_drops_at_rate_scales_the_rest_and_passes_the_mask_back(compiled):
    p = 0.25
    fn = (lambda x: fd.dropout(x, p, True))
    if compiled:
        fn = torch.compile(fn, dynamic=True)
    for n in (40_000, 30_002):  # a second shape: the compiled graph must take it too
        x = (torch.rand(n, device=DEVICE) + 0.5).requires_grad_()
        y = fn(x)
        keep = y != 0
        assert abs(keep.float().mean().item() - (1 - p)) < 0.015
        torch.testing.assert_close(y[keep], x[keep] * kept_scale(p))
        y.backward(torch.ones_like(y))
        torch.testing.assert_close(x.grad, keep.float() * kept_scale(p))
    assert not torch.equal(fn(x) != 0, fn(x) != 0)  # a new mask every call


@needs_kernel
def test_dropout_masks_follow_the_global_seed():
    x = torch.ones(5000, device=DEVICE)
    torch.manual_seed(7)
    a = fd.dropout(x, 0.1, True)
    torch.manual_seed(7)
    b = fd.dropout(x, 0.1, True)
    torch.manual_seed(8)
    c = fd.dropout(x, 0.1, True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_is_the_identity_when_not_training_or_p_is_zero():
    x = torch.randn(10, 4)
    assert fd.dropout(x, 0.3, False) is x
    assert fd.dropout(x, 0.0, True) is x


def test_dropout_falls_back_to_torch_where_the_kernels_cannot_run(monkeypatch):
    monkeypatch.setattr(fused_attention, "available", lambda device: False)
    x = torch.ones(20_000)
    y = fd.dropout(x, 0.5, True)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert abs((y == 0).float().mean().item() - 0.5) < 0.02
