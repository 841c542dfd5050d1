"""Emulate dQ summed by bf16 atomic adds over 64-key tiles vs one rounding of the fp32 sum."""
import torch
torch.manual_seed(0)
BH, L, dh, BN = 256, 208, 64, 64
q, k, v, do = (torch.randn(BH, L, dh) for _ in range(4))
s = q @ k.transpose(1, 2) / 8
s = s.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf"))
p = s.softmax(-1)
o = p @ v
dp = do @ v.transpose(1, 2)
ds = p * (dp - (do * o).sum(-1, keepdim=True)) / 8
kb = k.bfloat16().float()
exact = ds @ kb                                  # fp32 dQ
once = exact.bfloat16().float()                  # the former dQ pass: one rounding
acc = torch.zeros_like(exact).bfloat16()
for j in range(0, L, BN):                        # one bf16 atomic add per key tile (fp32 partial, rounded)
    part = (ds[:, :, j:j + BN].bfloat16().float() @ kb[:, j:j + BN]).bfloat16()
    acc = (acc.float() + part.float()).bfloat16()
rel = lambda a: ((a - exact).norm() / exact.norm()).item()
print(f"one rounding {rel(once):.2e}; bf16 adds over {L // BN + 1} key tiles {rel(acc.float()):.2e}")
