"""The pure-torch AdamW step: the oracle every native path is tested against. It is
torch.optim.AdamW's single-tensor update, written out in the same order of operations."""
from __future__ import annotations

import math

import torch

from ..backends import register_kernel


@register_kernel("adamw_step", "reference")
@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize):
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


def coefficients(step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> list[float]:
    """The fp32 coefficients of one tensor's step, in the order kernels/adamw.cl reads them
    (csrc/adamw_bindings.cpp computes the same in double, each rounded once to fp32)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return [1 - lr * weight_decay, float(weight_decay != 0), 1 - beta1, beta2, 1 - beta2,
            math.sqrt(bias_correction2), eps, -(lr / bias_correction1)]
