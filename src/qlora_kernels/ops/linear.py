"""The fused linear ops, declared once: schema, fake implementation, argument checks and
autograd. Kernels come from the selected backend (reference: dequantize + torch matmul).

All arithmetic is fp32: bf16/fp16 activations are widened on entry and the result is
rounded back to the activation dtype, so every backend agrees within fp32 tolerance."""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import checks, eager
from ..backends import run



def no_autocast(fn):
    """The ops define fp32 arithmetic; under torch.autocast (the HF Trainer and TRL turn
    on bf16 autocast on CPUs that have it) the torch calls inside them must not be
    downcast behind our back."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_autocast_enabled("cpu"):  # the context is entered only when needed
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def fp32_rows(t: torch.Tensor) -> torch.Tensor:
    """fp32 with a contiguous last dimension (what the row kernels index; other strides kept)."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """[rows, last dim], a view where one exists: reshape(-1, 0) cannot infer the rows of an
    empty layer's input."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _nrows(t: torch.Tensor) -> int:
    return math.prod(t.shape[:-1])


def fresh_result(t: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """``t`` (a fresh contiguous result) in ``dtype`` and ``shape`` without returning a
    view: autograd forbids in-place updates of custom-op outputs that are views, and PEFT's
    mixed-batch forward updates the output in place."""
    t = t if t.dtype == dtype else t.to(dtype)
    if t._base is not None:
        # a kernel's reshaped result (view(...) of its own fresh buffer): the buffer itself when
        # the view is all of it, else a copy (Llama 4's shared expert adds to its output in place)
        base = t._base
        whole = (t.is_contiguous() and base.is_contiguous() and t.numel() == base.numel()
                 and t.storage_offset() == base.storage_offset())
        t = base if whole else t.clone()
    shape = tuple(shape)
    return t if tuple(t.shape) == shape else t.resize_(shape)


# ---------------------------------------------------------------- linear_4bit ----

@no_autocast
def linear_4bit_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                     out_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x @ dequantize(W).T (+ bias), W [out_features, x.shape[-1]], fp32 arithmetic."""
    return _linear_run("linear_4bit", x, packed, absmax, blocksize, quant_type, out_features, bias)


def _linear_run(kernel: str, x, packed, absmax, blocksize, quant_type, out_features, bias) -> torch.Tensor:
    checks.weight(x, packed, absmax, blocksize, quant_type, out_features, None, bias)
    x2 = rows_2d(x).float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = run(kernel, x2, packed.contiguous(), absmax.contiguous(), blocksize, quant_type, out_features, b)
    return fresh_result(y, x.dtype, (*x.shape[:-1], out_features))


linear_4bit = torch.library.custom_op("qlora_kernels::linear_4bit", mutates_args=())(linear_4bit_impl)


@no_autocast
def linear_4bit_int8_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                          quant_type: str, out_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """linear_4bit in int8 arithmetic (opt-in; csrc/linear4_q8.h has the definition): x
    quantized to int8 per block of its row, the codebook as int8, exact integer dot
    products scaled in fp32. The backward is the fp32 one of linear_4bit (straight-through
    for the activation quantization)."""
    return _linear_run("linear_4bit_int8", x, packed, absmax, blocksize, quant_type, out_features, bias)


linear_4bit_int8 = torch.library.custom_op("qlora_kernels::linear_4bit_int8", mutates_args=())(linear_4bit_int8_impl)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_call_ok(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an op may run its implementation directly instead of through the
    dispatcher: eager, plain CPU tensors, no autograd needed, no torch function or
    dispatch mode active. The dispatcher and custom-op wrappers are a sizeable part of
    an M=1 4096x4096 linear_4bit; everything they would add (autograd, fake tensors,
    tracing, modes) is excluded by these conditions."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        # nn.Parameter (adapter weights) is a plain tensor to the dispatcher: its
        # __torch_function__ is torch's disabled default
        if type(t) not in _PLAIN_TYPES or not t.is_cpu or (grad and t.requires_grad):
            return False
    return not (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack() > 0)


@linear_4bit.register_fake
def _linear_fake(x, packed, absmax, blocksize, quant_type, out_features, bias):
    checks.weight(x, packed, absmax, blocksize, quant_type, out_features, None, bias)
    return x.new_empty((*x.shape[:-1], out_features))


linear_4bit_int8.register_fake(_linear_fake)


@no_autocast
def linear_4bit_grad_input_impl(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                           quant_type: str, in_features: int) -> torch.Tensor:
    """dx = dy @ dequantize(W), W [dy.shape[-1], in_features]: the input gradient of
    linear_4bit (the frozen 4-bit weight itself gets none)."""
    checks.weight(dy, packed, absmax, blocksize, quant_type, None, in_features, x_name="dy")
    dy2 = rows_2d(dy).float().contiguous()
    dx = run("linear_4bit_grad_input", dy2, packed.contiguous(), absmax.contiguous(), blocksize, quant_type,
             in_features)
    return fresh_result(dx, dy.dtype, (*dy.shape[:-1], in_features))


linear_4bit_grad_input = torch.library.custom_op("qlora_kernels::linear_4bit_grad_input",
                                                 mutates_args=())(linear_4bit_grad_input_impl)


@linear_4bit_grad_input.register_fake
def _(dy, packed, absmax, blocksize, quant_type, in_features):
    checks.weight(dy, packed, absmax, blocksize, quant_type, None, in_features, x_name="dy")
    return dy.new_empty((*dy.shape[:-1], in_features))


def _linear_setup(ctx, inputs, output):
    x, packed, absmax, blocksize, quant_type, out_features, bias = inputs
    ctx.save_for_backward(packed, absmax)
    ctx.meta = (blocksize, quant_type, x.shape[-1], x.dtype, bias is not None)


def _sum_leading(dy: torch.Tensor) -> torch.Tensor:
    return rows_2d(dy).float().sum(0)


@no_autocast
def _linear_backward(ctx, dy):
    packed, absmax = ctx.saved_tensors
    blocksize, quant_type, in_features, x_dtype, has_bias = ctx.meta
    dx = db = None
    if ctx.needs_input_grad[0]:
        grad_input = eager.backward_op(ctx, linear_4bit_grad_input, linear_4bit_grad_input_impl)
        dx = grad_input(dy.contiguous(), packed, absmax, blocksize, quant_type, in_features).to(x_dtype)
    if has_bias and ctx.needs_input_grad[6]:
        db = _sum_leading(dy)
    return dx, None, None, None, None, None, db


linear_4bit.register_autograd(_linear_backward, setup_context=_linear_setup)
linear_4bit_int8.register_autograd(_linear_backward, setup_context=_linear_setup)
linear_4bit_call = eager.function("qlora_kernels::linear_4bit", linear_4bit, linear_4bit_impl, _linear_setup,
                                  _linear_backward)
linear_4bit_int8_call = eager.function("qlora_kernels::linear_4bit_int8", linear_4bit_int8, linear_4bit_int8_impl,
                                       _linear_setup, _linear_backward)


# ------------------------------------------------------------------- LoRA ops ----

# The adapter's kernels (lora_linear_4bit, lora_forward_tail, lora_backward) come from the
# backend like every other kernel; backends/reference.py defines them.

@no_autocast
def lora_linear_4bit_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                     out_features: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     bias: Optional[torch.Tensor], noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, u): y = linear_4bit(x) + scaling * (u @ B.T), u = (x * noise) @ A.T; ``noise`` is
    the already-scaled dropout mask (None: no dropout). u is kept for the backward."""
    checks.weight(x, packed, absmax, blocksize, quant_type, out_features, None, bias)
    checks.lora(x, lora_A, lora_B, out_features, bias, noise, scaling)
    x2 = rows_2d(x).float().contiguous()
    n2 = None if noise is None else noise.reshape(x2.shape).float()
    b = None if bias is None else bias.float().contiguous()
    y, u = run("lora_linear_4bit", x2, packed.contiguous(), absmax.contiguous(), blocksize, quant_type, out_features,
               lora_A, lora_B, scaling, b, n2)
    return fresh_result(y, x.dtype, (*x.shape[:-1], out_features)), u


# the implementation stays callable on its own: functional.lora_linear_4bit runs it without
# the dispatcher when plain_call_ok (inference), as linear_4bit does
lora_linear_4bit = torch.library.custom_op("qlora_kernels::lora_linear_4bit", mutates_args=())(lora_linear_4bit_impl)


@lora_linear_4bit.register_fake
def _(x, packed, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling, bias, noise):
    checks.weight(x, packed, absmax, blocksize, quant_type, out_features, None, bias)
    checks.lora(x, lora_A, lora_B, out_features, bias, noise, scaling)
    m = _nrows(x)
    return x.new_empty((*x.shape[:-1], out_features)), x.new_empty((m, lora_A.shape[0]), dtype=torch.float32)


def _lora4_setup(ctx, inputs, output):
    x, packed, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling, bias, noise = inputs
    ctx.save_for_backward(x, packed, absmax, lora_A, lora_B, noise, output[1])
    ctx.meta = (blocksize, quant_type, scaling, bias is not None)


@no_autocast
def lora_linear_4bit_backward_impl(dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                              blocksize: int, quant_type: str, lora_A: torch.Tensor, lora_B: torch.Tensor,
                              scaling: float, noise: Optional[torch.Tensor], u: torch.Tensor,
                              need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB) of lora_linear_4bit (dx: x's shape and dtype, an empty tensor unless
    need_x; dA, dB fp32) from dy and the forward's u. One op, so that a backend can run
    the base layer's input gradient and the adapter's products as one native step (the
    cpu backend adds the adapter's share of dx into the base's, in place)."""
    checks.rows("x", x)
    checks.lora_dy(dy, x)
    N = dy.shape[-1]
    checks.weight(x, packed, absmax, blocksize, quant_type, N, None)
    checks.lora(x, lora_A, lora_B, N, None, noise, scaling)
    checks.lora_u(u, x, lora_A)
    K = x.shape[-1]
    dy2 = rows_2d(dy).float().contiguous()
    x2 = rows_2d(x).float()
    n2 = None if noise is None else noise.reshape(x2.shape).float()
    dx, dA, dB = run("lora_linear_4bit_backward", dy2, x2, u, packed.contiguous(), absmax.contiguous(), blocksize,
                     quant_type, lora_A, lora_B, scaling, n2, need_x)
    dx = dx.to(x.dtype).reshape(x.shape) if need_x else x.new_empty((0,))
    return dx, dA, dB


lora_linear_4bit_backward = torch.library.custom_op("qlora_kernels::lora_linear_4bit_backward",
                                                    mutates_args=())(lora_linear_4bit_backward_impl)


@lora_linear_4bit_backward.register_fake
def _(dy, x, packed, absmax, blocksize, quant_type, lora_A, lora_B, scaling, noise, u, need_x):
    checks.rows("x", x)
    checks.lora_dy(dy, x)
    N = dy.shape[-1]
    checks.weight(x, packed, absmax, blocksize, quant_type, N, None)
    checks.lora(x, lora_A, lora_B, N, None, noise, scaling)
    checks.lora_u(u, x, lora_A)
    f32 = torch.float32
    return (x.new_empty(x.shape if need_x else (0,)), lora_A.new_empty(lora_A.shape, dtype=f32),
            lora_B.new_empty(lora_B.shape, dtype=f32))


@no_autocast
def _lora4_backward(ctx, dy, _du_unused):
    x, packed, absmax, lora_A, lora_B, noise, u = ctx.saved_tensors
    blocksize, quant_type, scaling, has_bias = ctx.meta
    need_x = ctx.needs_input_grad[0]
    backward = eager.backward_op(ctx, lora_linear_4bit_backward, lora_linear_4bit_backward_impl)
    dx, dA, dB = backward(dy, x, packed, absmax, blocksize, quant_type, lora_A, lora_B, scaling, noise, u, need_x)
    db = _sum_leading(dy) if has_bias and ctx.needs_input_grad[9] else None
    return (dx if need_x else None, None, None, None, None, None, dA.to(lora_A.dtype), dB.to(lora_B.dtype), None, db,
            None)


lora_linear_4bit.register_autograd(_lora4_backward, setup_context=_lora4_setup)
lora_linear_4bit_call = eager.function("qlora_kernels::lora_linear_4bit", lora_linear_4bit, lora_linear_4bit_impl,
                                       _lora4_setup, _lora4_backward)


@no_autocast
def lora_linear_impl(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                bias: Optional[torch.Tensor], noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, u) for a dense base: y = x @ weight.T (+ bias) + scaling * (u @ B.T)."""
    checks.dense(x, weight)
    checks.lora(x, lora_A, lora_B, weight.shape[0], bias, noise, scaling)
    x2 = rows_2d(x).float().contiguous()
    n2 = None if noise is None else noise.reshape(x2.shape).float()
    y = x2 @ weight.float().t()
    if bias is not None:
        y += bias.float()
    u = run("lora_forward_tail", x2, y, lora_A, lora_B, scaling, n2)
    return fresh_result(y, x.dtype, (*x.shape[:-1], weight.shape[0])), u


lora_linear = torch.library.custom_op("qlora_kernels::lora_linear", mutates_args=())(lora_linear_impl)


@lora_linear.register_fake
def _(x, weight, lora_A, lora_B, scaling, bias, noise):
    checks.dense(x, weight)
    checks.lora(x, lora_A, lora_B, weight.shape[0], bias, noise, scaling)
    m = _nrows(x)
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((m, lora_A.shape[0]), dtype=torch.float32)


def _lora_dense_setup(ctx, inputs, output):
    x, weight, lora_A, lora_B, scaling, bias, noise = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, noise, output[1])
    ctx.meta = (scaling, bias is not None)


@no_autocast
def _lora_dense_backward(ctx, dy, _du_unused):
    x, weight, lora_A, lora_B, noise, u = ctx.saved_tensors
    scaling, has_bias = ctx.meta
    dy2 = rows_2d(dy).float().contiguous()
    x2 = rows_2d(x).float()
    n2 = None if noise is None else noise.reshape(x2.shape).float()
    need_x = ctx.needs_input_grad[0]
    dA, dB, dx_lora = run("lora_backward", dy2, x2, u, lora_A, lora_B, scaling, n2, need_x)
    dx = dW = None
    if need_x:
        dx = torch.addmm(dx_lora, dy2, weight.float()).to(x.dtype).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        dW = (dy2.t() @ x2).to(weight.dtype)
    db = _sum_leading(dy) if has_bias and ctx.needs_input_grad[5] else None
    return dx, dW, dA.to(lora_A.dtype), dB.to(lora_B.dtype), None, db, None


lora_linear.register_autograd(_lora_dense_backward, setup_context=_lora_dense_setup)
lora_linear_call = eager.function("qlora_kernels::lora_linear", lora_linear, lora_linear_impl, _lora_dense_setup,
                                  _lora_dense_backward)
