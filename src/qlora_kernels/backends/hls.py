"""The hls backend: the Vitis-HLS-style kernels of ``hls/`` C-simulated on the CPU
(``qlora_kernels._hls``, built from the same sources a board build uses), driven by the
host call sequences of ``hls/host``. It exists to hold the FPGA code to the reference
under the same tests as every backend: it is correct, not fast.

Kernels: dequantize_4bit(_out) on the decode unit (bit-exact), linear_4bit on the GEMV
engine (one row) or the GEMM tile engine, linear_4bit_grad_input on the input-gradient
engine; a weight whose blocks straddle rows (in_features % blocksize != 0) is expanded by
the decode unit and multiplied on the LoRA down-projection engine. Every other op falls
back to the reference (``backends.kernel_for`` says which runs)."""
from __future__ import annotations

import functools

import torch

from .. import _hls, formats
from . import register_dequantize_from_out, register_kernel


@functools.cache
def _code(quant_type: str) -> torch.Tensor:
    # The codebook ROM's contents come from formats.py at every call: the HLS sources hold none.
    return formats.codebook(quant_type)


@register_kernel("dequantize_4bit_out", "hls")
def dequantize_4bit_out(packed, absmax, blocksize, quant_type, out):
    target = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
    _hls.dequantize_4bit(packed.data_ptr(), packed.numel(), absmax.data_ptr(), absmax.numel(),
                         _code(quant_type).data_ptr(), target.numel(), blocksize, target.data_ptr())
    if target is not out:
        out.copy_(target)  # the reference rounds the fp32 product to the dtype the same way


register_dequantize_from_out("hls", dequantize_4bit_out)


@register_kernel("linear_4bit", "hls")
def linear_4bit(x2, packed, absmax, blocksize, quant_type, out_features, bias):
    M, K = x2.shape
    y = torch.empty((M, out_features), dtype=torch.float32)
    _hls.linear_4bit(x2.data_ptr(), M, K, packed.data_ptr(), packed.numel(), absmax.data_ptr(), absmax.numel(),
                     _code(quant_type).data_ptr(), out_features, blocksize,
                     0 if bias is None else bias.data_ptr(), y.data_ptr())
    return y


@register_kernel("linear_4bit_grad_input", "hls")
def linear_4bit_grad_input(dy2, packed, absmax, blocksize, quant_type, in_features):
    M, N = dy2.shape
    dx = torch.empty((M, in_features), dtype=torch.float32)
    _hls.linear_4bit_grad_input(dy2.data_ptr(), M, N, packed.data_ptr(), packed.numel(), absmax.data_ptr(),
                                absmax.numel(), _code(quant_type).data_ptr(), in_features, blocksize, dx.data_ptr())
    return dx
