"""Causal self-attention for a decoder's training step, with its backward:
``causal_attention``.

torch's CPU ``scaled_dot_product_attention`` (its flash kernel) spends ~70 GFLOP/s on a
small model's heads (SmolLM2: 9 heads of 64, 3 key/value heads, 256 positions); half of it
is the backward. Here (csrc/attention.h) a block of query rows takes its scores against
every key it can see in one scratch block, so the softmax has its true row maximum and
only the per-row log-sum-exp is kept for the backward, which recomputes the
probabilities (flash attention's memory: O(rows x keys) per thread, no [S, S] tensor per
head kept for autograd). Grouped-query attention reads each key/value head in place.

The output is laid out [batch, positions, heads, head size], what transformers' attention
functions return, so the decoder's reshape to [batch, positions, hidden] costs nothing.
Arithmetic is fp32: bf16/fp16 inputs are widened on entry and the output rounded once."""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import run
from . import checks, eager
from .linear import fp32_rows, no_autocast


@no_autocast
def causal_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     key_lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, S, H, D] in q's dtype, lse [B, H, S] fp32) of causal attention of q [B, H, S, D]
    over k, v [B, Hk, S, D] (H a multiple of Hk): out[b, i, h] = sum_{j <= i, j < L_b}
    softmax_j(scale * q[b, h, i] . k[b, h // (H / Hk), j]) v[b, h // (H / Hk), j], where L_b is
    key_lengths[b] (right padding masked as transformers' sdpa mask does; S when None)."""
    checks.attention(q, k, v, scale, key_lengths)
    out, lse = run("causal_attention", fp32_rows(q), fp32_rows(k), fp32_rows(v), float(scale), key_lengths)
    return out.to(q.dtype), lse


causal_attention = torch.library.custom_op("qlora_kernels::causal_attention", mutates_args=())(causal_attention_impl)


@causal_attention.register_fake
def _(q, k, v, scale, key_lengths=None):
    checks.attention(q, k, v, scale, key_lengths, values=False)
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D)), q.new_empty((B, H, S), dtype=torch.float32)


@no_autocast
def causal_attention_backward_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, scale: float,
                              key_lengths: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of causal_attention from its output and lse (the probabilities are
    recomputed); keys past key_lengths get zero gradients."""
    checks.attention_backward(dout, q, k, v, out, lse, scale, key_lengths)
    dq, dk, dv = run("causal_attention_backward", *(fp32_rows(t) for t in (dout, q, k, v, out)), lse.contiguous(),
                     float(scale), key_lengths)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


causal_attention_backward = torch.library.custom_op("qlora_kernels::causal_attention_backward",
                                                    mutates_args=())(causal_attention_backward_impl)


@causal_attention_backward.register_fake
def _(dout, q, k, v, out, lse, scale, key_lengths=None):
    checks.attention_backward(dout, q, k, v, out, lse, scale, key_lengths, values=False)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, scale, key_lengths = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, *output, key_lengths)
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_lengths = ctx.saved_tensors
    backward = eager.backward_op(ctx, causal_attention_backward, causal_attention_backward_impl)
    dq, dk, dv = backward(dout, q, k, v, out, lse, ctx.scale, key_lengths)
    need = ctx.needs_input_grad
    return (dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None), None, None


causal_attention.register_autograd(_backward, setup_context=_setup)
causal_attention_call = eager.function("qlora_kernels::causal_attention", causal_attention,
                                       causal_attention_impl, _setup, _backward)
