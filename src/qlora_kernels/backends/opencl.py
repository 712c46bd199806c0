"""The opencl backend: the kernels of kernels/*.cl through pyopencl, on the device that
qlora_kernels.opencl selects (PoCL on a CPU emulates an FPGA board).  Importing this
module fails, with install advice, when pyopencl or an OpenCL device is missing; the
registry then reports the backend as unavailable with that reason.

Kernels receive exactly what the reference kernels receive and return CPU tensors.
Quantization and 4-bit dequantization are bit-exact with the reference; the linear and
LoRA kernels agree with it within the fp32 dot-product bound.  The 8-bit quantizer of
double quantization stays on the reference kernel (it runs on the absmax vector only);
its decoder runs here.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import formats
from .. import opencl as ocl
from .._errors import nonfinite_error
from ..formats import dtype_code
from . import register_dequantize_from_out, register_kernel

_RT = ocl.runtime()  # no platform/device: raises here, and the registry reports why

I32, I64, F32 = np.int32, np.int64, np.float32
_LOCAL = 64
_GEMM_BM, _GEMM_BN = 128, 64  # kernels/linear4.cl defaults (QK_BM, QK_BN)
_GEMM_LOCAL = (_GEMM_BN // 16, _GEMM_BM // 8)
_GEMV_ROWS = (1, 2, 4, 8)
_TASK_RMAX = 64  # QK_RMAX of linear4_task.cl
_INT_MAX = 2**31 - 1


def _up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _qt(quant_type: str) -> int:
    return formats.QUANT_TYPES.index(quant_type)


def _shift(blocksize: int) -> int:
    if blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two for the opencl kernels, got {blocksize}")
    return blocksize.bit_length() - 1


def _fpga() -> bool:
    return ocl.get_style() == "fpga"


def _check_int(**sizes: int) -> None:
    for name, v in sizes.items():
        if v > _INT_MAX:
            raise ValueError(f"{name}={v} exceeds the int32 range of the opencl kernels")


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


# ------------------------------------------------------------------- quantize ----

@register_kernel("quantize_4bit", "opencl")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    n = A.numel()
    if n == 0:
        return torch.empty((0, 1), dtype=torch.uint8), torch.empty((0,), dtype=torch.float32)
    nb = formats.num_blocks(n, blocksize)
    _check_int(blocks=nb)
    packed = torch.empty((formats.packed_numel(n), 1), dtype=torch.uint8)
    absmax = torch.empty((nb,), dtype=torch.float32)
    bad = torch.tensor([_INT_MAX], dtype=torch.int32)
    with _RT.op("quantize_4bit") as op:
        src = op.upload("src", A.contiguous())
        d_bad = op.upload("bad", bad)
        d_packed, d_absmax = _RT.scratch("packed", packed.numel()), _RT.scratch("absmax", 4 * nb)
        args = (src, I32(dtype_code(A.dtype)), I64(n), I32(blocksize), I32(_qt(quant_type)), d_packed, d_absmax, d_bad)
        if _fpga():
            op.launch("quant4", "quantize4_task", (1,), (1,), *args)
        else:
            op.launch("quant4", "quantize4_nd", (_up(nb, _LOCAL),), (_LOCAL,), *args)
        op.download("bad", d_bad, bad)
        if int(bad[0]) != _INT_MAX:
            raise nonfinite_error(int(bad[0]), blocksize)
        op.download("packed", d_packed, packed)
        op.download("absmax", d_absmax, absmax)
    return packed, absmax


@register_kernel("dequantize_4bit_out", "opencl")
def dequantize_4bit_out(packed, absmax, blocksize, quant_type, out):
    n = out.numel()
    if n == 0:
        return
    with _RT.op("dequantize_4bit") as op:
        d_packed, d_absmax = op.upload("packed", packed), op.upload("absmax", absmax)
        d_out = _RT.scratch("out", n * out.element_size())
        args = (d_packed, d_absmax, I64(n), I32(_shift(blocksize)), I32(_qt(quant_type)),
                I32(dtype_code(out.dtype)), d_out)
        if _fpga():
            op.launch("quant4", "dequantize4_task", (1,), (1,), *args)
        else:
            op.launch("quant4", "dequantize4_nd", (_up(-(-n // 16), _LOCAL),), (_LOCAL,), *args)
        op.download("out", d_out, out)


register_dequantize_from_out("opencl", dequantize_4bit_out)


@register_kernel("dequantize_blockwise_8bit", "opencl")
def dequantize_blockwise_8bit(q, absmax, code, blocksize):
    out = torch.empty(q.shape, dtype=torch.float32)
    n = q.numel()
    if n == 0:
        return out
    with _RT.op("dequantize_blockwise_8bit") as op:
        d_q, d_a, d_c = op.upload("q", q), op.upload("absmax", absmax), op.upload("code", code)
        d_out = _RT.scratch("out", 4 * n)
        op.launch("quant4", "dequantize8_nd", (_up(n, _LOCAL),), (_LOCAL,), d_q, d_a, d_c, I64(n), I64(blocksize), d_out)
        op.download("out", d_out, out)
    return out


# --------------------------------------------------------------------- linear ----

def _weight_args(op, packed, absmax, blocksize, quant_type):
    return (_RT.resident(packed, op), _RT.resident(absmax, op), I32(_shift(blocksize)), I32(_qt(quant_type)))


def _forward_on_device(op, x2, packed, absmax, blocksize, quant_type, N, bias, lora=None, need_x=False, fpga=None):
    """Runs the base layer (and, in the FPGA style, the fused adapter) into scratch "y";
    returns the device buffers of x (None unless used or need_x), y and (adapter fused) u."""
    M, K = x2.shape
    _check_int(M=M, K=K, N=N)
    fpga = _fpga() if fpga is None else fpga  # the caller's one reading of the style, where it has one
    gemv = not fpga and M <= _GEMV_ROWS[-1]
    xsplit = 2 if gemv and K % 128 == 0 and _RT.device.endian_little else 1 if gemv and K % 32 == 0 else 0
    d_x = op.upload("x", x2) if need_x or not xsplit else None
    d_b = op.upload("bias", bias) if bias is not None else None
    d_y = _RT.scratch("y", 4 * M * N)
    P, A, sh, qt = _weight_args(op, packed, absmax, blocksize, quant_type)
    base = (d_x, I32(M), I32(K), P, A, sh, qt, I32(N), d_b, I32(bias is not None), d_y)
    if fpga:
        R, d_A, d_B, scaling, d_noise, d_u = 0, None, None, 0.0, None, None
        if lora is not None:
            lora_A, lora_B, scaling, noise2 = lora
            R = lora_A.shape[0]
            d_A, d_B = op.upload("lora_A", lora_A), op.upload("lora_B", lora_B)
            d_noise = op.upload("noise", noise2) if noise2 is not None else None
            d_u = _RT.scratch("u", 4 * M * R)
        op.launch("linear4_task", "linear4_fwd_task", (1,), (1,), *base, I32(R), d_A, d_B, F32(scaling), d_noise,
                  I32(d_noise is not None), d_u)
        return d_x, d_y, d_u
    if M <= _GEMV_ROWS[-1]:
        mm = next(r for r in _GEMV_ROWS if r >= M)
        if xsplit:  # x in the order the kernel decodes weights in, so it never interleaves nibbles
            base = (op.upload("x_split", _gemv_order(x2, xsplit)),) + base[1:]
        op.launch("linear4", f"linear4_fwd_gemv{mm}", (_up(N, _LOCAL),), (_LOCAL,), *base, I32(xsplit))
    else:
        op.launch("linear4", "linear4_fwd_gemm", (_up(N, _GEMM_BN) // 16, _up(M, _GEMM_BM) // 8), _GEMM_LOCAL, *base)
    return d_x, d_y, None


# Element of a dword's 8 that nibble step S decodes (linear4.cl).  index_select, not x[..., list]:
# advanced indexing with a list costs milliseconds here, more than the kernel.
_DWORD_ORDER = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])


def _gemv_order(x2: torch.Tensor, xsplit: int) -> torch.Tensor:
    M, K = x2.shape
    if xsplit == 2:
        return x2.view(M, K // 128, 16, 8).index_select(3, _DWORD_ORDER).transpose(2, 3).contiguous()
    return x2.view(M, K // 32, 16, 2).transpose(2, 3).contiguous()


def _empty_linear(M, N, bias):
    y = torch.zeros(M, N)
    return y + bias if bias is not None else y


@register_kernel("linear_4bit", "opencl")
def linear_4bit(x2, packed, absmax, blocksize, quant_type, out_features, bias):
    M, K = x2.shape
    if M == 0 or out_features == 0 or K == 0:
        return _empty_linear(M, out_features, bias)
    y = torch.empty(M, out_features)
    with _RT.op("linear_4bit") as op:
        _, d_y, _ = _forward_on_device(op, x2, packed, absmax, blocksize, quant_type, out_features, bias)
        op.download("y", d_y, y)
    return y


@register_kernel("linear_4bit_grad_input", "opencl")
def linear_4bit_grad_input(dy2, packed, absmax, blocksize, quant_type, in_features):
    M, N = dy2.shape
    K = in_features
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, K)
    _check_int(M=M, K=K, N=N)
    dx = torch.empty(M, K)
    with _RT.op("linear_4bit_grad_input") as op:
        d_dy = op.upload("dy", dy2)
        d_dx = _RT.scratch("dx", 4 * M * K)
        P, A, sh, qt = _weight_args(op, packed, absmax, blocksize, quant_type)
        args = (d_dy, I32(M), I32(N), P, A, sh, qt, I32(K), d_dx)
        if _fpga():
            op.launch("linear4_task", "linear4_bwd_task", (1,), (1,), *args)
        elif M <= _GEMV_ROWS[-1]:
            mm = next(r for r in _GEMV_ROWS if r >= M)
            cols = 32 if K % 32 == 0 else 16
            op.launch("linear4", f"linear4_bwd_gemv{mm}", (_up(-(-K // cols), 16),), (16,), *args)
        else:
            op.launch("linear4", "linear4_bwd_gemm", (_up(K, _GEMM_BN) // 16, _up(M, _GEMM_BM) // 8), _GEMM_LOCAL,
                      *args)
        op.download("dx", d_dx, dx)
    return dx


# ----------------------------------------------------------------------- LoRA ----
# The adapter kernels of the op layer (backends/reference.py defines them): the adapter's
# products run on the device, and the fused forward keeps y there between base and adapter.
_MB, _RB = 4, 8  # QK_MB, QK_RB of kernels/lora.cl


def _rowdot(op, d_a, d_noise, M, L, d_b, R, scale, role):
    d_out = _RT.scratch(role, 4 * M * R)
    op.launch("lora", "lora_rowdot", (_up(R, 8), _up(M, 8)), (8, 8), d_a, d_noise, I32(d_noise is not None), I32(M),
              I32(L), d_b, I32(R), F32(scale), d_out)
    return d_out


def _rowmix(op, d_c, d_b, M, L, R, scale, accumulate, d_noise, d_out):
    op.launch("lora", "lora_rowmix", (_up(-(-L // 16), 16), _up(-(-M // _MB), 4)), (16, 4), d_c, d_b, I32(M), I32(L),
              I32(R), F32(scale), I32(accumulate), d_noise, I32(d_noise is not None), d_out)


def _colmix(op, d_a, d_noise, M, L, d_c, R, scale, transposed, d_out):
    op.launch("lora", "lora_colmix", (_up(-(-L // 16), 16), _up(-(-R // _RB), 1)), (16, 1), d_a, d_noise,
              I32(d_noise is not None), I32(M), I32(L), d_c, I32(R), F32(scale), I32(transposed), d_out)


def _adapter_forward(op, d_x, d_y, M, K, N, lora_A, lora_B, scaling, noise2):
    """u = (x * noise) @ A.T on the device, then y += scaling * u @ B.T in place."""
    R = lora_A.shape[0]
    d_noise = op.upload("noise", noise2) if noise2 is not None else None
    d_A, d_Bt = op.upload("lora_A", lora_A), op.upload("lora_Bt", lora_B.t().contiguous())
    d_u = _rowdot(op, d_x, d_noise, M, K, d_A, R, 1.0, "u")
    _rowmix(op, d_u, d_Bt, M, N, R, scaling, 1, None, d_y)
    return d_u


def _u_of_empty(x2: torch.Tensor, lora_A: torch.Tensor, noise2) -> torch.Tensor:
    """u of a call with no rows, columns or outputs: (x * noise) A^T on the host (an empty
    product for M = 0 or K = 0; with N = 0 the layer has no output but u is still the
    forward's, as the reference computes it)."""
    xd = x2 if noise2 is None else x2 * noise2
    return xd @ lora_A.t()


@register_kernel("lora_linear_4bit", "opencl")
def lora_linear_4bit(x2, packed, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling, bias,
                     noise2):
    """(y, u) of the adapted layer, every product on the device, y never leaving it
    between the base and the adapter (FPGA style: one fused kernel, u on chip)."""
    M, K = x2.shape
    N, R = out_features, lora_A.shape[0]
    x2, lora_A, lora_B, noise2, bias = x2.float().contiguous(), _f32(lora_A), _f32(lora_B), _f32(noise2), _f32(bias)
    if M == 0 or N == 0 or K == 0:  # nothing to add to y; u = x A^T still (zero only when K is)
        return _empty_linear(M, N, bias), _u_of_empty(x2, lora_A, noise2)
    y, u = torch.empty(M, N), torch.empty(M, R)
    fpga = _fpga()  # read once: the fused path and _forward_on_device must agree on it
    fused = fpga and R <= _TASK_RMAX
    with _RT.op("lora_linear_4bit") as op:
        lora = (lora_A, lora_B, scaling, noise2) if fused else None
        d_x, d_y, d_u = _forward_on_device(op, x2, packed, absmax, blocksize, quant_type, N, bias, lora,
                                           need_x=not fused, fpga=fpga)
        if not fused:
            d_u = _adapter_forward(op, d_x, d_y, M, K, N, lora_A, lora_B, scaling, noise2)
        op.download("y", d_y, y)
        op.download("u", d_u, u)
    return y, u


@register_kernel("lora_forward_tail", "opencl")
def lora_forward_tail(x2, y, lora_A, lora_B, scaling, noise2):
    """Adds scaling * ((x2 * noise2) @ A.T) @ B.T to y in place; returns u."""
    M, K = x2.shape
    N, R = y.shape[1], lora_A.shape[0]
    if M == 0 or K == 0 or N == 0:
        return _u_of_empty(x2.float(), _f32(lora_A), _f32(noise2))
    u = torch.empty(M, R)
    with _RT.op("lora_forward_tail") as op:
        d_x, d_y = op.upload("x", x2.float().contiguous()), op.upload("y", y)
        d_u = _adapter_forward(op, d_x, d_y, M, K, N, _f32(lora_A), _f32(lora_B), scaling, _f32(noise2))
        op.download("u", d_u, u)
        op.download("y", d_y, y)
    return u


@register_kernel("lora_backward", "opencl")
def lora_backward(dy2, x2, u, lora_A, lora_B, scaling, noise2, need_x):
    """(dA, dB, dx_lora or None), as the reference kernel."""
    M, N = dy2.shape
    K, R = x2.shape[1], lora_A.shape[0]
    dA, dB = torch.zeros(R, K), torch.zeros(N, R)
    dx = torch.zeros(M, K) if need_x else None
    if M == 0 or N == 0 or K == 0:
        return dA, dB, dx
    with _RT.op("lora_backward") as op:
        d_dy, d_x, d_u = op.upload("dy", _f32(dy2)), op.upload("x", _f32(x2)), op.upload("u", _f32(u))
        d_A, d_Bt = op.upload("lora_A", _f32(lora_A)), op.upload("lora_Bt", _f32(lora_B).t().contiguous())
        d_noise = op.upload("noise", _f32(noise2)) if noise2 is not None else None
        d_du = _rowdot(op, d_dy, None, M, N, d_Bt, R, scaling, "du")
        d_dB, d_dA = _RT.scratch("dB", 4 * N * R), _RT.scratch("dA", 4 * R * K)
        _colmix(op, d_dy, None, M, N, d_u, R, scaling, 1, d_dB)
        _colmix(op, d_x, d_noise, M, K, d_du, R, 1.0, 0, d_dA)
        if need_x:
            d_dx = _RT.scratch("dx", 4 * M * K)
            _rowmix(op, d_du, d_A, M, K, R, 1.0, 0, d_noise, d_dx)
            op.download("dx", d_dx, dx)
        op.download("dA", d_dA, dA)
        op.download("dB", d_dB, dB)
    return dA, dB, dx


@register_kernel("dora_weight_norm", "opencl")
def dora_weight_norm(packed, absmax, blocksize, quant_type, out_features, in_features, lora_A, lora_B, scaling,
                     base_sq=None):
    """||W + scaling * B @ A|| over each output row (PEFT's DoRA weight norm), fp32 [N],
    computed from the packed weight (resident on the device) without decoding it whole;
    ``base_sq`` is not needed here (the kernel sums W + sBA row by row)."""
    N, K, R = out_features, in_features, lora_A.shape[0]
    if N == 0 or K == 0:
        return torch.zeros(N)
    _check_int(N=N, K=K)
    norm = torch.empty(N)
    with _RT.op("dora_weight_norm") as op:
        P, A, sh, qt = _weight_args(op, packed, absmax, blocksize, quant_type)
        d_A, d_B = op.upload("lora_A", _f32(lora_A)), op.upload("lora_B", _f32(lora_B))
        d_norm = _RT.scratch("norm", 4 * N)
        op.launch("lora", "dora_norm", (_up(N, _LOCAL),), (_LOCAL,), P, A, sh, qt, I32(N), I32(K), d_A, d_B, I32(R),
                  F32(scaling), d_norm)
        op.download("norm", d_norm, norm)
    return norm


# ---------------------------------------------------------------------- adamw ----

def _adamw_coefficients(step: float, lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float) -> list[float]:
    """The fp32 coefficients of one tensor's step, in the order kernels/adamw.cl reads them
    (csrc/adamw_bindings.cpp computes the same in double, each rounded once to fp32)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return [1 - lr * weight_decay, float(weight_decay != 0), 1 - beta1, beta2, 1 - beta2,
            math.sqrt(bias_correction2), eps, -(lr / bias_correction1)]


@register_kernel("adamw_step", "opencl")
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize):
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    if total == 0:
        return
    _check_int(elements=total)
    offsets = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)
    coeffs = torch.tensor([c for s in steps for c in _adamw_coefficients(s, lr, beta1, beta2, eps, weight_decay)],
                          dtype=torch.float32)
    flat = {role: torch.cat([t.reshape(-1) for t in ts])
            for role, ts in (("p", params), ("g", grads), ("m", exp_avgs), ("v", exp_avg_sqs))}
    with _RT.op("adamw_step") as op:
        bufs = {role: op.upload(f"adamw {role}", t) for role, t in flat.items()}
        args = (bufs["p"], bufs["g"], bufs["m"], bufs["v"], op.upload("adamw offsets", offsets),
                op.upload("adamw coeffs", coeffs), I32(len(sizes)), I32(bool(maximize)))
        if _fpga():
            op.launch("adamw", "adamw_task", (1,), (1,), *args)
        else:
            op.launch("adamw", "adamw_nd", (_up(total, _LOCAL),), (_LOCAL,), *args)
        for role in ("p", "m", "v"):
            op.download(f"adamw {role}", bufs[role], flat[role])
    for role, ts in (("p", params), ("m", exp_avgs), ("v", exp_avg_sqs)):
        for t, part in zip(ts, flat[role].split(sizes)):
            t.copy_(part.view(t.shape))
