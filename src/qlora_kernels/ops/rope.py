"""Rotary position embedding of queries and keys, with its backward: ``rope``.

The "rotate half" layout of transformers' ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2,
Phi-3, SmolLM2): ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``.
As PyTorch ops that is ten passes over q and k each way with a fresh tensor per pass; here
one pass each way (csrc/rope.cpp). Each product is rounded before the add, as torch
rounds them, so fp32 results are torch's. cos and sin get no gradient (transformers computes
them from a buffer without one).

The outputs are laid out [batch, positions, heads, head size] (the projections' layout,
which the fused attention reads and whose gradient reshapes to the projection's for free),
returned as [batch, heads, positions, head size] views by ``functional.rope``."""
from __future__ import annotations

import torch

from ..backends import run
from . import checks, eager
from .linear import fp32_rows, no_autocast


def _run(q, k, cos, sin, backward: bool):
    """The backend's rope kernel on q, k [B, heads, S, D] (any strides): [B, S, heads, D]
    outputs in q's and k's dtypes."""
    qo, ko = run("rope", fp32_rows(q), fp32_rows(k), cos.float().contiguous(), sin.float().contiguous(), backward)
    return qo.to(q.dtype), ko.to(k.dtype)


@no_autocast
def rope_impl(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out [B, S, H, D], k_out [B, S, Hk, D]) in q's and k's dtypes, for q [B, H, S, D],
    k [B, Hk, S, D] and cos, sin [1 or B, S, D] (broadcast over heads)."""
    checks.rope(q, k, cos, sin)
    return _run(q, k, cos, sin, False)


rope = torch.library.custom_op("qlora_kernels::rope", mutates_args=())(rope_impl)


@rope.register_fake
def _(q, k, cos, sin):
    checks.rope(q, k, cos, sin)
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D)), k.new_empty((B, S, k.shape[1], D))


@no_autocast
def rope_backward_impl(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input gradients of rope, laid out [B, S, H, D], from the output gradients dq
    [B, S, H, D] and dk [B, S, Hk, D]."""
    checks.rope(dq.transpose(1, 2), dk.transpose(1, 2), cos, sin)
    return _run(dq.transpose(1, 2), dk.transpose(1, 2), cos, sin, True)


rope_backward = torch.library.custom_op("qlora_kernels::rope_backward", mutates_args=())(rope_backward_impl)


@rope_backward.register_fake
def _(dq, dk, cos, sin):
    checks.rope(dq.transpose(1, 2), dk.transpose(1, 2), cos, sin)
    return dq.new_empty(dq.shape), dk.new_empty(dk.shape)


def _setup(ctx, inputs, output):
    _q, _k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    need = ctx.needs_input_grad
    gq, gk = eager.backward_op(ctx, rope_backward, rope_backward_impl)(dq, dk, cos, sin)
    return (gq.transpose(1, 2) if need[0] else None), (gk.transpose(1, 2) if need[1] else None), None, None


rope.register_autograd(_backward, setup_context=_setup)
rope_call = eager.function("qlora_kernels::rope", rope, rope_impl, _setup, _backward)
