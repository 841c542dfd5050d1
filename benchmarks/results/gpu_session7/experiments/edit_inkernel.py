p='climber/fused_attention.py'; s=open(p).read()
def rep(a,b,count=1):
    global s
    assert s.count(a)==count, (a[:60], s.count(a))
    s=s.replace(a,b)

rep('''two more kernels build f_b densely and reduce its gradient.

What the bias really needs: f_b(block, scenario) is shared by every layer of a block, so it
is built densely once per step, (B*K, H, S, S) in the compute dtype, by `prepare` (a kernel
reading the small tables, a position-bucket LUT and per-sample time-gap buckets), and each
layer's kernel reads one bias tile beside its q.k tile: no bucket arithmetic or table
gathers per score element. Backward, each layer adds d bias = dS / tau for its tiles into one
buffer shared by the layers,''','''one more reduces f_b's gradient to its tables.

What the bias really needs: f_b(block, scenario) is two small tables per (sample-block, head),
32 position and 32 time values here, 128 bytes each, indexed by a position bucket that
depends only on (i, j) and a time-gap bucket per sample. So the kernels never read a dense
f_b: each tile loads its int16 bucket ids (the position LUT (S, S), shared by every program,
and the sample's (S, S) time buckets, shared by its heads, so both stay in cache) and
gathers both values from the tables, one cache line each. A dense (B*K, H, S, S) f_b in
bf16 would be 354 MB at the paper config, read three times a layer. Backward, each layer
adds d bias = dS / tau for its tiles into one dense buffer shared by the layers,''')
rep('''    bias: torch.Tensor  # (BK, H, S, S) dense f_b in the compute dtype (no autograd: see `token`)
    token: torch.Tensor  # scalar the layers take, so the table reduction runs after all of them
''','''    pos: torch.Tensor  # (BK, H, P) fp32 position table per sample-block (no autograd: see `token`)
    tim: torch.Tensor  # (BK, H, T) fp32 time table
    pb: torch.Tensor  # (S, S) int16 position buckets
    tb: torch.Tensor  # (BK, S, S) int16 time buckets
    dtype: torch.dtype  # of the summed d f_b: the compute dtype
    token: torch.Tensor  # scalar the layers take, so the table reduction runs after all of them
''')
rep('''    grad: dict = field(default_factory=dict)  # "dense": (BK, H, S, S) sum of the layers' d f_b, bias's dtype


class _DenseBias(torch.autograd.Function):
    """(BK, H, P) position and (BK, H, T) time tables, (S, S) position buckets and (BK, S, S)
    time buckets -> dense f_b (BK, H, S, S) in `dtype` and the token; backward reduces the
    layers' summed dense gradient, which the kernels leave causal (zero above the diagonal),
    to the tables."""

    @staticmethod
    def forward(ctx, pos, tim, pb, tb, dtype, grad):
        BK, H, P = pos.shape
        L = pb.shape[0]
        pb, tb = pb.to(torch.int16).contiguous(), tb.to(torch.int16).contiguous()  # bucket ids < 2^15
        bias = torch.empty(BK, H, L, L, dtype=dtype, device=pos.device)
        grid = (BK * H, triton.cdiv(L, BLOCK))
        _bias_fwd_kernel[grid](pos.float().contiguous(), tim.float().contiguous(), pb, tb, bias, H, L, P=P,
                               T=tim.shape[-1], BM=BLOCK, BN=BLOCK, num_warps=4)
        ctx.save_for_backward(pb, tb)
        ctx.sizes = P, tim.shape[-1]
        ctx.grad = grad
        ctx.mark_non_differentiable(bias)
        ctx.set_materialize_grads(False)
        return bias, pos.new_zeros(())
''','''    grad: dict = field(default_factory=dict)  # "dense": (BK, H, S, S) sum of the layers' d f_b, in `dtype`


class _TableBias(torch.autograd.Function):
    """(BK, H, P) position and (BK, H, T) time tables, (S, S) position buckets and (BK, S, S)
    time buckets (int16) -> the tables as the kernels read them (fp32, contiguous, outside
    autograd) and the token; backward reduces the layers' summed dense gradient, which the
    kernels leave causal (zero above the diagonal), to the tables."""

    @staticmethod
    def forward(ctx, pos, tim, pb, tb, grad):
        ctx.save_for_backward(pb, tb)
        ctx.sizes = pos.shape[-1], tim.shape[-1]
        ctx.grad = grad
        pos, tim = pos.detach().float().contiguous(), tim.detach().float().contiguous()
        ctx.mark_non_differentiable(pos, tim)
        ctx.set_materialize_grads(False)
        return pos, tim, pos.new_zeros(())
''')
rep('''    def backward(ctx, _, __):
        pb, tb = ctx.saved_tensors
        P, T = ctx.sizes
        g = ctx.grad.pop("dense", None)  # consumed: a second backward starts from zero
        if g is None:  # no layer ran backward
            return None, None, None, None, None, None''','''    def backward(ctx, _, __, ___):
        pb, tb = ctx.saved_tensors
        P, T = ctx.sizes
        g = ctx.grad.pop("dense", None)  # consumed: a second backward starts from zero
        if g is None:  # no layer ran backward
            return None, None, None, None, None''')
rep('''        return dpos.sum(1), dtim.sum(1), None, None, None, None


def prepare(''','''        return dpos.sum(1), dtim.sum(1), None, None, None


def prepare(''')
rep('''    grad: dict = {}
    bias, token = _DenseBias.apply(pos, tim, pb, tb, dtype, grad)
    S = valid.shape[-1]
    idx = torch.where(valid, torch.arange(S, device=valid.device), S)
    first = idx.min(dim=-1).values.to(torch.int32)  # S if no valid key
    return FusedInputs(bias, token, valid.to(torch.int8).contiguous(), first, n_hist, grad)''','''    grad: dict = {}
    pb, tb = pb.to(torch.int16).contiguous(), tb.to(torch.int16).contiguous()  # bucket ids < 2^15
    pos, tim, token = _TableBias.apply(pos, tim, pb, tb, grad)
    S = valid.shape[-1]
    idx = torch.where(valid, torch.arange(S, device=valid.device), S)
    first = idx.min(dim=-1).values.to(torch.int32)  # S if no valid key
    return FusedInputs(pos, tim, pb, tb, dtype, token, valid.to(torch.int8).contiguous(), first, n_hist, grad)''')
rep('''        _fwd_kernel[_grid(q, "fwd")](q, k, v, fi.bias, inv_tau,''','''        _fwd_kernel[_grid(q, "fwd")](q, k, v, *_bias_args(fi), inv_tau,''')
rep('''            fi.grad["dense"] = torch.zeros(fi.bias.shape, dtype=fi.bias.dtype, device=q.device)
        dbias = fi.grad.get("dense", fi.bias)  # (an unused pointer without need_dbias)''','''            fi.grad["dense"] = torch.zeros(B * K, H, L, L, dtype=fi.dtype, device=q.device)
        dbias = fi.grad.get("dense", dout)  # (an unused pointer without need_dbias)''')
rep('''        args = (q, k, v, fi.bias, inv_tau,''','''        args = (q, k, v, *_bias_args(fi), inv_tau,''')
rep('''def split_heads(qkv: torch.Tensor)''','''def _bias_args(fi: FusedInputs) -> tuple:
    """The kernels' f_b arguments: tables, buckets and the tables' widths."""
    return fi.pos, fi.tim, fi.pb, fi.tb, fi.pos.shape[-1], fi.tim.shape[-1]


def split_heads(qkv: torch.Tensor)''')
old_tile=s[s.index('    @triton.jit\n    def _tile_scores'):s.index('    @triton.jit\n    def _one_hot')]
new_tile='''    @triton.jit
    def _tile_scores(q, k, POS, TIM, PB, TB, bh, b, inv, valid_ptr, rows, cols, L, NH, P, T, PREC: tl.constexpr):
        """Raw q.k + bias (BM, BN) in fp32, the scaled score s and the allowed mask (keys from
        NH on, the candidates, are seen by their own row only). The bias is gathered from
        sample-block b's tables (head row bh) by the tile's bucket ids."""
        col_ok = cols < L
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        in_seq = (rows[:, None] < L) & col_ok[None, :]
        idx = rows[:, None] * L + cols[None, :]
        pb = tl.load(PB + idx, mask=in_seq, other=0).to(tl.int32)
        tb = tl.load(TB + b * L * L + idx, mask=in_seq, other=0).to(tl.int32)
        raw = qk + tl.load(POS + bh * P + pb) + tl.load(TIM + bh * T + tb)
        key_ok = tl.load(valid_ptr + cols, mask=col_ok, other=0) != 0
        diag = rows[:, None] == cols[None, :]
        seen = key_ok & (cols < NH)
        ok = (cols[None, :] <= rows[:, None]) & (seen[None, :] | diag) & col_ok[None, :]
        return raw, raw * inv, ok

'''
s=s.replace(old_tile,new_tile)
rep('''    def _fwd_kernel(Q, K, V, BIAS, INV,''','''    def _fwd_kernel(Q, K, V, POS, TIM, PB, TB, P, T, INV,''')
rep('''            k = _load_rows(K, qo, cols, sql, dims, kv_ok)
            bias_ptrs = BIAS + bh * L * L + rows[:, None] * L + cols[None, :]
            _, s, ok = _tile_scores(q, k, bias_ptrs, inv, VALID + b * L, rows, cols, L, NH, PREC)''','''            k = _load_rows(K, qo, cols, sql, dims, kv_ok)
            _, s, ok = _tile_scores(q, k, POS, TIM, PB, TB, bh, b, inv, VALID + b * L, rows, cols, L, NH, P, T, PREC)''')
rep('''    def _bwd_dkdv_kernel(Q, K, V, BIAS, INV,''','''    def _bwd_dkdv_kernel(Q, K, V, POS, TIM, PB, TB, P, T, INV,''')
rep('''            bias_ptrs = BIAS + bh * L * L + rows[:, None] * L + cols[None, :]
            raw, s, ok = _tile_scores(q, k, bias_ptrs, inv, VALID + b * L, rows, cols, L, NH, PREC)
            p = tl.where(ok & row_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
            dv +=''','''            raw, s, ok = _tile_scores(q, k, POS, TIM, PB, TB, bh, b, inv, VALID + b * L, rows, cols, L, NH, P, T,
                                      PREC)
            p = tl.where(ok & row_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
            dv +=''')
rep('''    def _bwd_dq_kernel(Q, K, V, BIAS, INV,''','''    def _bwd_dq_kernel(Q, K, V, POS, TIM, PB, TB, P, T, INV,''')
rep('''            v = _load_rows(V, qo, cols, sql, dims, kv_ok)
            bias_ptrs = BIAS + bh * L * L + rows[:, None] * L + cols[None, :]
            raw, s, ok = _tile_scores(q, k, bias_ptrs, inv, VALID + b * L, rows, cols, L, NH, PREC)''','''            v = _load_rows(V, qo, cols, sql, dims, kv_ok)
            raw, s, ok = _tile_scores(q, k, POS, TIM, PB, TB, bh, b, inv, VALID + b * L, rows, cols, L, NH, P, T,
                                      PREC)''')
open(p,'w').write(s)
