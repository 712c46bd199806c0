"""The fused RMSNorm and SwiGLU of a Llama-style decoder layer, with their backward ops.

Unfused, an fp32 RMSNorm is five elementwise torch ops forward (pow, mean, add+rsqrt, two
muls) and about a dozen backward, each a pass over the activations; silu(gate) * up is
two forward and three backward, and autograd keeps silu(gate) alive for the product's
backward. Here each is one pass forward and one backward (Liger-Kernel's and Unsloth's
idea on GPUs; csrc/norm_act.h on the CPU): RMSNorm saves x and the per-row rstd, SwiGLU
saves gate and up only and recomputes the sigmoid in its backward.

Arithmetic is fp32 (transformers' LlamaRMSNorm computes the norm in fp32 too): bf16/fp16
inputs are widened on entry and each result is rounded once to its input's dtype."""
from __future__ import annotations

import torch

from ..backends import run
from . import checks, eager
from .linear import fp32_rows, fresh_result, no_autocast, rows_2d


# ------------------------------------------------------------------- rms_norm ----

@no_autocast
def rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): rstd = 1 / sqrt(mean(x^2 over the last dim) + eps) (fp32, x's shape without
    its last dim) and y = weight * (x * rstd) in x's dtype. The op's implementation, which a
    caller may run directly where ``linear.plain_call_ok`` holds (inference: the dispatcher
    and custom-op wrappers cost more than the kernel at one row)."""
    checks.rms_norm(x, weight, eps)
    return rms_norm_run(x, weight, eps)


def rms_norm_run(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_impl after its checks, for a caller that has made them (nn.RMSNorm's
    inference path: fp32 CPU x and a 1-D weight of x's last size)."""
    y, rstd = run("rms_norm", x.reshape(-1, x.shape[-1]).float().contiguous(), weight.float().contiguous(),
                  float(eps))
    return fresh_result(y, x.dtype, x.shape), fresh_result(rstd, torch.float32, x.shape[:-1])


rms_norm = torch.library.custom_op("qlora_kernels::rms_norm", mutates_args=())(rms_norm_impl)


@rms_norm.register_fake
def _(x, weight, eps):
    checks.rms_norm(x, weight, eps)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@no_autocast
def rms_norm_backward_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      need_dweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of rms_norm given its rstd; dweight (summed over rows, weight's dtype)
    is an empty tensor unless need_dweight."""
    checks.rms_norm_backward(dy, x, weight, rstd)
    K = x.shape[-1]
    dx, dw = run("rms_norm_backward", dy.reshape(-1, K).float().contiguous(), x.reshape(-1, K).float().contiguous(),
                 weight.float().contiguous(), rstd.reshape(-1).contiguous(), bool(need_dweight))
    dw = dw.to(weight.dtype) if need_dweight else x.new_empty((0,), dtype=weight.dtype)
    return fresh_result(dx, x.dtype, x.shape), dw


rms_norm_backward = torch.library.custom_op("qlora_kernels::rms_norm_backward", mutates_args=())(rms_norm_backward_impl)


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, need_dweight):
    checks.rms_norm_backward(dy, x, weight, rstd)
    return x.new_empty(x.shape), x.new_empty(weight.shape if need_dweight else (0,), dtype=weight.dtype)


def _rms_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx, dw = eager.backward_op(ctx, rms_norm_backward, rms_norm_backward_impl)(dy, x, weight, rstd, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


rms_norm.register_autograd(_rms_backward, setup_context=_rms_setup)
rms_norm_call = eager.function("qlora_kernels::rms_norm", rms_norm, rms_norm_impl, _rms_setup, _rms_backward)


# --------------------------------------------------------------------- swiglu ----

@no_autocast
def swiglu_impl(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, in gate's dtype."""
    checks.swiglu(gate, up)
    return fresh_result(run("swiglu", fp32_rows(rows_2d(gate)), fp32_rows(rows_2d(up))), gate.dtype, gate.shape)


swiglu = torch.library.custom_op("qlora_kernels::swiglu", mutates_args=())(swiglu_impl)


@swiglu.register_fake
def _(gate, up):
    checks.swiglu(gate, up)
    return gate.new_empty(gate.shape)


@no_autocast
def swiglu_backward_impl(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of swiglu, the sigmoid recomputed from gate."""
    checks.swiglu(gate, up, dh)
    dg, du = run("swiglu_backward", fp32_rows(rows_2d(dh)).contiguous(), *(fp32_rows(rows_2d(t)) for t in (gate, up)))
    return fresh_result(dg, gate.dtype, gate.shape), fresh_result(du, up.dtype, up.shape)


swiglu_backward = torch.library.custom_op("qlora_kernels::swiglu_backward", mutates_args=())(swiglu_backward_impl)


@swiglu_backward.register_fake
def _(dh, gate, up):
    checks.swiglu(gate, up, dh)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dh):
    gate, up = ctx.saved_tensors
    dg, du = eager.backward_op(ctx, swiglu_backward, swiglu_backward_impl)(dh, gate, up)
    return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


swiglu.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)
swiglu_call = eager.function("qlora_kernels::swiglu", swiglu, swiglu_impl, _swiglu_setup, _swiglu_backward)
