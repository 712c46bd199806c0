"""The quantization ops, each declared once: a torch.library schema, its fake (meta)
implementation and its argument checks. The real implementation forwards to the selected backend's kernel."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import formats
from ..backends import run
from . import checks

@torch.library.custom_op("qlora_kernels::quantize_4bit", mutates_args=())
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization: (packed uint8 [(n+1)//2, 1], absmax fp32 [blocks])."""
    checks.quantize_4bit(A, blocksize, quant_type)
    return run("quantize_4bit", A.contiguous(), blocksize, quant_type)


@quantize_4bit.register_fake
def _(A, blocksize, quant_type):
    checks.quantize_4bit(A, blocksize, quant_type)
    n = A.numel()
    return (A.new_empty((formats.packed_numel(n), 1), dtype=torch.uint8),
            A.new_empty((formats.num_blocks(n, blocksize),), dtype=torch.float32))


@torch.library.custom_op("qlora_kernels::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Decode to ``shape`` in ``dtype``: code[nibble] * absmax in fp32, then rounded."""
    checks.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)
    return run("dequantize_4bit", packed.contiguous(), absmax.contiguous(), blocksize, quant_type,
               [int(s) for s in shape], dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, blocksize, quant_type, shape, dtype):
    checks.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.custom_op("qlora_kernels::dequantize_4bit_out", mutates_args=("out",))
def dequantize_4bit_out(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                        out: torch.Tensor) -> None:
    """``dequantize_4bit`` into a caller-owned contiguous ``out`` (its shape and dtype)."""
    checks.dequantize_4bit(packed, absmax, blocksize, quant_type, out.shape, out.dtype, out)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    run("dequantize_4bit_out", packed.contiguous(), absmax.contiguous(), blocksize, quant_type, out)


@dequantize_4bit_out.register_fake
def _(packed, absmax, blocksize, quant_type, out):
    checks.dequantize_4bit(packed, absmax, blocksize, quant_type, out.shape, out.dtype, out)


@torch.library.custom_op("qlora_kernels::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a sorted map (double quantization of absmax)."""
    checks.blockwise_8bit(A, code, blocksize)
    return run("quantize_blockwise_8bit", A.contiguous(), code.contiguous(), blocksize)


@quantize_blockwise_8bit.register_fake
def _(A, code, blocksize):
    checks.blockwise_8bit(A, code, blocksize)
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((formats.num_blocks(A.numel(), blocksize),))


@torch.library.custom_op("qlora_kernels::dequantize_blockwise_8bit", mutates_args=())
def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    checks.dequantize_blockwise_8bit(q, absmax, code, blocksize)
    return run("dequantize_blockwise_8bit", q.contiguous(), absmax.contiguous(), code.contiguous(), blocksize)


@dequantize_blockwise_8bit.register_fake
def _(q, absmax, code, blocksize):
    checks.dequantize_blockwise_8bit(q, absmax, code, blocksize)
    return q.new_empty(q.shape, dtype=torch.float32)
