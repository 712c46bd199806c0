"""The reference backend: pure torch, no native code. It is the test oracle for every
other backend and the definition of the arithmetic (order of operations included) that
makes packed bytes bit-exact with bitsandbytes. Every kernel of every op is defined here;
a backend without its own kernel for an op runs this one."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import formats
from .._errors import nonfinite_error
from . import register_kernel, run

_FLOOR = formats.ABSMAX_FLOOR


def _nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[:n].long()


@register_kernel("quantize_4bit", "reference")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    x = A.reshape(-1).float()
    n = x.numel()
    nb = formats.num_blocks(n, blocksize)
    if n == 0:
        return torch.empty((0, 1), dtype=torch.uint8), torch.empty((0,), dtype=torch.float32)
    bad = ~torch.isfinite(x)
    if bad.any():
        raise nonfinite_error(int(bad.nonzero()[0, 0]) // blocksize, blocksize)
    bounds, order = formats.quant_tables(quant_type)
    full = (n // blocksize) * blocksize
    parts, absmax = [], []
    if full:
        blocks = x[:full].view(-1, blocksize)
        amax = blocks.abs().amax(dim=1)
        parts.append((blocks * (1.0 / amax.clamp(min=_FLOOR)).unsqueeze(1)).clamp(-1, 1).reshape(-1))
        absmax.append(amax)
    if full < n:
        am = x[full:].abs().amax().clamp(min=_FLOOR)
        parts.append((x[full:] / am).clamp(-1, 1))
        absmax.append(am.reshape(1))
    scaled = torch.cat(parts)
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    nib = order.long()[torch.bucketize(scaled, bounds)]
    packed = ((nib[0::2] << 4) | nib[1::2]).to(torch.uint8).unsqueeze(1)
    out_absmax = torch.cat(absmax)
    assert out_absmax.numel() == nb
    return packed, out_absmax


@register_kernel("dequantize_4bit", "reference")
def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype):
    n = 1
    for s in shape:
        n *= s
    code = formats.codebook(quant_type)
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[_nibbles(packed, n)] * scale).to(dtype).reshape(shape)


@register_kernel("dequantize_4bit_out", "reference")
def dequantize_4bit_out(packed, absmax, blocksize, quant_type, out):
    out.copy_(dequantize_4bit(packed, absmax, blocksize, quant_type, list(out.shape), out.dtype))


@register_kernel("quantize_blockwise_8bit", "reference")
def quantize_blockwise_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """bitsandbytes' CPU rule (see csrc/blockwise8.cpp): 65,536 equal bins on [-1, 1],
    each mapped to the code whose midpoint interval holds the bin's left edge."""
    x = A.reshape(-1)
    n = x.numel()
    nb = formats.num_blocks(n, blocksize)
    if n == 0:
        return torch.empty_like(A, dtype=torch.uint8), torch.empty((0,), dtype=torch.float32)
    bins = 65536
    mids = 0.5 * (code[:-1] + code[1:])
    left = -1.0 + (2.0 * torch.arange(bins, dtype=torch.float32)) / float(bins - 1)
    table = torch.searchsorted(mids, left, right=False)
    padded = torch.nn.functional.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)
    amax = padded.abs().amax(dim=1)
    inv = 1.0 / amax
    v = (padded * inv.unsqueeze(1)).clamp(-1, 1)
    pos = ((v + 1.0) * 0.5 * float(bins - 1) + 0.5).to(torch.int64)
    q = torch.where((amax == 0).unsqueeze(1), 0, table[pos.clamp(0, bins - 1)])
    return q.reshape(-1)[:n].to(torch.uint8).reshape(A.shape), amax


@register_kernel("dequantize_blockwise_8bit", "reference")
def dequantize_blockwise_8bit(q, absmax, code, blocksize):
    n = q.numel()
    return (code[q.reshape(-1).long()] * absmax.repeat_interleave(blocksize)[:n]).reshape(q.shape)


def _dense_weight(packed, absmax, blocksize, quant_type, out_features, in_features):
    return dequantize_4bit(packed, absmax, blocksize, quant_type, [out_features, in_features], torch.float32)


@register_kernel("linear_4bit", "reference")
def linear_4bit(x2, packed, absmax, blocksize, quant_type, out_features, bias):
    W = _dense_weight(packed, absmax, blocksize, quant_type, out_features, x2.shape[1])
    return torch.nn.functional.linear(x2, W, bias)


def quantize_x_groups(x2: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantizer of the int8-compute linear (csrc/linear4_q8.h): per group
    of ``group`` elements of each row, xq = clamp(rint(x * (127 / amax)), -127, 127) and
    sx = amax / 127**2 (the int8 codebook's 1/127 folded in), both in fp32; all-zero
    groups give 0 and 0, non-finite ones 0 and NaN.
    Returns xq (int32, [M, K]) and sx ([M, ceil(K / group)])."""
    M, K = x2.shape
    ng = -(-K // group)
    xp = torch.nn.functional.pad(x2, (0, ng * group - K)).view(M, ng, group)
    finite = torch.isfinite(xp).all(-1)
    amax = torch.where(finite, xp.abs().amax(-1), torch.zeros(()))
    ok = finite & (amax > 0)
    # Tensor / tensor: an IEEE fp32 division (a Python scalar numerator would become a
    # reciprocal times the scalar, one more rounding than the C++ quantizer makes).
    inv = torch.where(ok, torch.full_like(amax, 127.0) / torch.where(ok, amax, torch.ones(())), torch.zeros(()))
    xq = torch.round(xp * inv.unsqueeze(-1)).clamp(-127, 127)
    xq = torch.where(ok.unsqueeze(-1), xq, torch.zeros(())).view(M, -1)[:, :K].to(torch.int32)
    sx = torch.where(finite, amax / torch.full_like(amax, 16129.0), torch.full_like(amax, float("nan")))
    return xq, sx


def _segments(N: int, K: int, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per element of W: its segment id within its row (a new segment where the x group or
    the flat weight block changes), and per (row, segment): the block and the group."""
    k = torch.arange(K)
    flat = torch.arange(N).unsqueeze(1) * K + k
    start = (k % blocksize == 0) | (flat % blocksize == 0)
    start[:, 0] = True
    seg = torch.cumsum(start.long(), 1) - 1
    nseg = int(seg.max()) + 1 if seg.numel() else 0
    block = torch.zeros(N, nseg, dtype=torch.long).scatter_(1, seg, flat // blocksize)
    group = torch.zeros(N, nseg, dtype=torch.long).scatter_(1, seg, (k // blocksize).expand(N, K))
    return seg, block, group


@register_kernel("linear_4bit_int8", "reference")
def linear_4bit_int8(x2, packed, absmax, blocksize, quant_type, out_features, bias):
    """y = sum over segments of float(exact integer dot) * fp32(absmax * sx), summed in
    fp64 and rounded once: the definition the native paths are held to."""
    M, K = x2.shape
    N = out_features
    y = torch.zeros(M, N, dtype=torch.float64)
    if M == 0 or N == 0 or K == 0:
        return (y.float() + bias) if bias is not None else y.float()
    xq, sx = quantize_x_groups(x2.float(), blocksize)
    code8 = formats.int8_codebook(quant_type).long()
    c8 = code8[_nibbles(packed, N * K)].view(N, K)
    seg, block, group = _segments(N, K, blocksize)
    nseg = block.shape[1]
    for n0 in range(0, N, 64):  # rows of W in slices: the products are [M, rows, K]
        n1 = min(N, n0 + 64)
        prod = xq.long().unsqueeze(1) * c8[n0:n1].unsqueeze(0)
        dots = torch.zeros(M, n1 - n0, nseg, dtype=torch.long).scatter_add_(2, seg[n0:n1].expand(M, -1, -1), prod)
        scale = absmax[block[n0:n1]].unsqueeze(0) * sx[:, group[n0:n1]]  # fp32 products, as the kernels
        used = torch.zeros(n1 - n0, nseg, dtype=torch.bool).scatter_(1, seg[n0:n1], True)
        y[:, n0:n1] = torch.where(used, dots.double() * scale.double(), torch.zeros((), dtype=torch.float64)).sum(-1)
    y = y.float()
    return y + bias if bias is not None else y


@register_kernel("linear_4bit_int8_one_row", "reference")
def linear_4bit_int8_one_row(packed, absmax, blocksize, quant_type, out_features, in_features):
    """No repacked layout here: a prepared weight's one-row int8 calls run linear_4bit_int8."""
    return None


@register_kernel("linear_4bit_bind", "reference")
def linear_4bit_bind(compute, packed, absmax, blocksize, quant_type, out_features):
    """No bound form here: a prepared weight calls the backend's linear_4bit(_int8) kernel."""
    return None


@register_kernel("linear_4bit_grad_input", "reference")
def linear_4bit_grad_input(dy2, packed, absmax, blocksize, quant_type, in_features):
    return dy2 @ _dense_weight(packed, absmax, blocksize, quant_type, dy2.shape[1], in_features)


def dense_out(out, rows: int, cols: int) -> torch.Tensor:
    """The result tensor of the dense kernels: ``out`` when given (a contiguous fp32
    [rows, cols] the caller reuses, e.g. one logits buffer for every chunk of the fused
    loss: a fresh 25 MB tensor per chunk was thousands of page faults per call), else a new one."""
    if out is None:
        return torch.empty((rows, cols), dtype=torch.float32)
    if out.dtype != torch.float32 or tuple(out.shape) != (rows, cols) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape ({rows}, {cols}), got {out.dtype} "
                         f"{tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
    return out


@register_kernel("linear_dense", "reference")
def linear_dense(x2, weight, bias, out=None):
    y = dense_out(out, x2.shape[0], weight.shape[0])
    # addmm is what F.linear runs with a bias, so both spellings give the same bits
    return torch.mm(x2, weight.t(), out=y) if bias is None else torch.addmm(bias, x2, weight.t(), out=y)


@register_kernel("linear_dense_grad_input", "reference")
def linear_dense_grad_input(dy2, weight, out=None):
    return torch.mm(dy2, weight, out=dense_out(out, dy2.shape[0], weight.shape[1]))


# ------------------------------------------------------------------- adapters ----
# The adapter kernels below are the definitions and also the generic fallbacks of every
# backend that has none of its own: a composite one (lora_linear_4bit) runs its parts with
# ``run``, so they go to the selected backend's own kernels (the cpu backend's 4-bit GEMM
# with the rank-r products in torch/MKL; an opencl device keeps y on the device instead).

@register_kernel("lora_forward_tail", "reference")
def lora_forward_tail(x2: torch.Tensor, y: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                      noise2: Optional[torch.Tensor]) -> torch.Tensor:
    """Adds scaling * (dropout(x) @ A.T) @ B.T to y in place; returns u = dropout(x) @ A.T."""
    xd = x2 if noise2 is None else x2 * noise2
    u = xd @ lora_A.float().t()
    y.addmm_(u, lora_B.float().t(), alpha=scaling)
    return u


@register_kernel("lora_linear_4bit", "reference")
def lora_linear_4bit(x2, packed, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling, bias, noise2):
    """(y, u): the 4-bit base, then the adapter added to y in place."""
    y = run("linear_4bit", x2, packed, absmax, blocksize, quant_type, out_features, bias)
    return y, run("lora_forward_tail", x2, y, lora_A, lora_B, scaling, noise2)


@register_kernel("lora_backward", "reference")
def lora_backward(dy2: torch.Tensor, x2: torch.Tensor, u: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  scaling: float, noise2: Optional[torch.Tensor], need_x: bool):
    """Gradients of the LoRA branch: dA, dB and the branch's share of dx (None unless need_x)."""
    du = (dy2 @ lora_B.float()).mul_(scaling)        # [M, r]
    dB = (dy2.t() @ u).mul_(scaling)                 # [N, r]
    xd = x2 if noise2 is None else x2 * noise2
    dA = du.t() @ xd                                 # [r, K]
    dx_lora = None
    if need_x:
        dx_lora = du @ lora_A.float()
        if noise2 is not None:
            dx_lora.mul_(noise2)
    return dA, dB, dx_lora


@register_kernel("lora_linear_4bit_backward", "reference")
def lora_linear_4bit_backward(dy2, x2, u, packed, absmax, blocksize, quant_type, lora_A, lora_B, scaling, noise2,
                              need_x: bool):
    """(dx or None, dA, dB) of lora_linear_4bit: the base layer's input gradient (the
    selected backend's kernel) plus the adapter's share, and the adapter's gradients."""
    dA, dB, dx_lora = run("lora_backward", dy2, x2, u, lora_A, lora_B, scaling, noise2, need_x)
    dx = None
    if need_x:
        dx = run("linear_4bit_grad_input", dy2, packed, absmax, blocksize, quant_type, x2.shape[1]).add_(dx_lora)
    return dx, dA, dB


@register_kernel("dora_weight_norm", "reference")
def dora_weight_norm(packed, absmax, blocksize, quant_type, out_features, in_features, lora_A, lora_B, scaling,
                     base_sq: Optional[torch.Tensor]):
    """||W_n + s (BA)_n|| per output row, fp32 [N], from the expansion
    ||W_n||² + 2s Σ_j B[n,j] (W Aᵀ)[n,j] + s² B_n (A Aᵀ) B_nᵀ in fp64: W Aᵀ is one 4-bit GEMM
    with the r rows of A as its input (the selected backend's), ``base_sq`` the fp64 row
    norms² of W the caller keeps for a frozen base (None: decoded here)."""
    A = lora_A.float().contiguous()  # the native kernels below read dense rows
    if base_sq is None:
        W = _dense_weight(packed, absmax, blocksize, quant_type, out_features, in_features)
        base_sq = W.double().pow(2).sum(1)
    WAt = run("linear_4bit", A, packed, absmax, blocksize, quant_type, out_features, None)  # [r, N]
    return dora_norm_from_parts(base_sq, WAt, A, lora_B, scaling)


def dora_norm_from_parts(base_sq: torch.Tensor, WAt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         scaling: float) -> torch.Tensor:
    """The expansion above from its parts (W Aᵀ given as [r, N]), in fp64; fp32 [N]."""
    B = B.double()
    G = A.double() @ A.double().t()
    sq = base_sq + 2 * scaling * (B * WAt.t().double()).sum(1) + scaling**2 * ((B @ G) * B).sum(1)
    return sq.clamp_min(0).sqrt().float()


# ---------------------------------------------------------------------- adamw ----

@register_kernel("adamw_step", "reference")
@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize):
    """torch.optim.AdamW's single-tensor update, written out in the same order of
    operations: the oracle every native AdamW path is tested against."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        if maximize:
            g = -g
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        p.addcdiv_(m, denom, value=-(lr / bias_correction1))


# ------------------------------------------------------------ rms_norm / swiglu ----
# x2, dy2: [rows, K] fp32; gate2, up2: [rows, N] fp32 (rows may be strided). The formulas
# are transformers' LlamaRMSNorm and torch's silu / silu_backward, in their order.

@register_kernel("rms_norm", "reference")
def rms_norm(x2: torch.Tensor, weight: torch.Tensor, eps: float):
    rstd = torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x2 * rstd), rstd.squeeze(-1)


@register_kernel("rms_norm_backward", "reference")
def rms_norm_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      need_dweight: bool):
    r = rstd.unsqueeze(-1)
    dyw = dy2 * weight
    c = r.pow(3) / x2.shape[-1] * (dyw * x2).sum(-1, keepdim=True)
    dx = r * dyw - x2 * c
    dw = (dy2 * (x2 * r)).sum(0) if need_dweight else None
    return dx, dw


@register_kernel("swiglu", "reference")
def swiglu(gate2: torch.Tensor, up2: torch.Tensor):
    return torch.nn.functional.silu(gate2) * up2


@register_kernel("swiglu_backward", "reference")
def swiglu_backward(dh2: torch.Tensor, gate2: torch.Tensor, up2: torch.Tensor):
    s = torch.sigmoid(gate2)
    return (dh2 * up2) * s * (1 + gate2 * (1 - s)), dh2 * torch.nn.functional.silu(gate2)


# --------------------------------------------------------- fused loss's row pass ----

@register_kernel("softmax_xent", "reference")
def softmax_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of fp32 logits [M, V] against int64 labels (< 0: an ignored
    row, loss 0); ``logits`` is overwritten with the gradient softmax - onehot (zeros for
    ignored rows). log_softmax is one fused pass in torch (logsumexp, sub and exp would be
    three)."""
    valid = labels >= 0
    safe = torch.where(valid, labels, 0).unsqueeze(1)
    logp = torch.log_softmax(logits, 1)
    loss = torch.where(valid, -logp.gather(1, safe).squeeze(1), 0.0)
    logits.copy_(logp.exp_())
    logits.scatter_add_(1, safe, -valid.to(logits.dtype).unsqueeze(1))
    if not bool(valid.all()):
        logits.mul_(valid.unsqueeze(1))
    return loss


# ------------------------------------------------------------------ attention ----
# q [B, H, S, D], k, v [B, Hk, S, D] fp32; out and dout [B, S, H, D]; lse [B, H, S]. The
# textbook formulas with the [S, S] probabilities materialized: the oracle of the kernels.

def _attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, lse: Optional[torch.Tensor] = None,
                     key_lengths: Optional[torch.Tensor] = None):
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    S = q.shape[2]
    masked = torch.ones(S, S, dtype=torch.bool).triu(1)
    if key_lengths is not None:  # [B, 1, S, S]: keys at or past a row's length
        masked = masked | (torch.arange(S) >= key_lengths.reshape(-1, 1, 1, 1))
    s.masked_fill_(masked, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse.unsqueeze(-1)), lse


def _per_kv_head(t: torch.Tensor, Hk: int) -> torch.Tensor:
    """[B, H, S, D] summed over each key/value head's group of query heads: [B, Hk, S, D]."""
    B, H, S, D = t.shape
    return t.reshape(B, Hk, H // Hk, S, D).sum(2)


@register_kernel("causal_attention", "reference")
def causal_attention(q, k, v, scale, key_lengths=None):
    p, lse = _attention_probs(q, k, scale, key_lengths=key_lengths)
    out = p @ v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    return out.transpose(1, 2).contiguous(), lse


@register_kernel("causal_attention_backward", "reference")
def causal_attention_backward(dout, q, k, v, out, lse, scale, key_lengths=None):
    G = q.shape[1] // k.shape[1]
    p, _ = _attention_probs(q, k, scale, lse, key_lengths)
    do, o = dout.transpose(1, 2), out.transpose(1, 2)
    vv, kk = v.repeat_interleave(G, 1), k.repeat_interleave(G, 1)
    dv = _per_kv_head(p.transpose(-1, -2) @ do, k.shape[1])
    ds = p * (do @ vv.transpose(-1, -2) - (do * o).sum(-1, keepdim=True)) * scale
    dq = ds @ kk
    dk = _per_kv_head(ds.transpose(-1, -2) @ q, k.shape[1])
    return dq, dk, dv


def rope_formula(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb op for op (the same bits in any dtype): x * cos +
    rotate_half(x) * sin for q and k, rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])."""
    c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def one(x):
        h = x.shape[-1] // 2
        return (x * c) + (torch.cat((-x[..., h:], x[..., :h]), dim=-1) * s)

    return one(q), one(k)


@register_kernel("rope", "reference")
def rope(q, k, cos, sin, backward):
    """q [B, H, S, D], k [B, Hk, S, D], cos, sin [1 or B, S, D] -> ([B, S, H, D], [B, S, Hk, D]):
    rope_formula, or (backward) the transpose of that map applied to x."""
    if backward:
        c, s = cos[:, None], sin[:, None]

        def transposed(x):
            h, t = x.shape[-1] // 2, x * s
            return x * c + torch.cat((t[..., h:], -t[..., :h]), -1)

        outs = transposed(q), transposed(k)
    else:
        outs = rope_formula(q, k, cos, sin)
    return tuple(y.transpose(1, 2).contiguous() for y in outs)
