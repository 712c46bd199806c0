"""The reference backend: pure torch, no native code. It is the test oracle for every
other backend and the definition of the arithmetic (order of operations included) that
makes packed bytes bit-exact with bitsandbytes."""
from __future__ import annotations

import torch

from .. import formats
from .._errors import nonfinite_error
from . import register_kernel

_FLOOR = 1e-38  # bitsandbytes' absmax clamp: all-zero blocks encode as the code of 0.0


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


@register_kernel("linear_4bit_grad_input", "reference")
def linear_4bit_grad_input(dy2, packed, absmax, blocksize, quant_type, in_features):
    return dy2 @ _dense_weight(packed, absmax, blocksize, quant_type, dy2.shape[1], in_features)


@register_kernel("linear_dense", "reference")
def linear_dense(x2, weight, bias):
    return torch.nn.functional.linear(x2, weight, bias)


@register_kernel("linear_dense_grad_input", "reference")
def linear_dense_grad_input(dy2, weight):
    return dy2 @ weight
