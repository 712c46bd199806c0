"""Each op declared once: a torch.library schema, its fake (meta) implementation and its
argument checks. The real implementation forwards to the selected backend's kernel."""
from __future__ import annotations

from typing import Sequence

import torch

from . import formats
from .backends import run

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES[dtype]


def check_quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in formats.INPUT_DTYPES:
        raise TypeError(f"W must be float32, bfloat16 or float16, got {A.dtype}")
    if A.device.type not in ("cpu", "meta"):
        raise ValueError(f"W must be on the CPU, got device {A.device}")
    if blocksize not in formats.BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {formats.BLOCKSIZES}, got {blocksize!r}")
    if quant_type not in formats.QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {formats.QUANT_TYPES}, got {quant_type!r}")


def check_dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                          shape: Sequence[int], dtype: torch.dtype) -> None:
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    if absmax.dtype != torch.float32:
        raise TypeError(f"state.absmax must be float32 here, got {absmax.dtype}")
    if packed.device.type not in ("cpu", "meta") or absmax.device.type not in ("cpu", "meta"):
        raise ValueError(f"packed and state.absmax must be on the CPU, got {packed.device} and {absmax.device}")
    if blocksize not in formats.BLOCKSIZES:
        raise ValueError(f"state.blocksize must be one of {formats.BLOCKSIZES}, got {blocksize!r}")
    if quant_type not in formats.QUANT_TYPES:
        raise ValueError(f"state.quant_type must be one of {formats.QUANT_TYPES}, got {quant_type!r}")
    if dtype not in formats.INPUT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"state.shape must be non-negative, got {tuple(shape)}")
    n = 1
    for s in shape:
        n *= int(s)
    if packed.numel() != formats.packed_numel(n):
        raise ValueError(
            f"packed has {packed.numel()} bytes but state.shape {tuple(shape)} needs {formats.packed_numel(n)}:"
            " the packed tensor does not belong to this state"
        )
    if absmax.numel() != formats.num_blocks(n, blocksize):
        raise ValueError(
            f"state.absmax has {absmax.numel()} entries but shape {tuple(shape)} with blocksize {blocksize}"
            f" needs {formats.num_blocks(n, blocksize)}"
        )


@torch.library.custom_op("qlora_kernels::quantize_4bit", mutates_args=())
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization: (packed uint8 [(n+1)//2, 1], absmax fp32 [blocks])."""
    check_quantize_4bit(A, blocksize, quant_type)
    return run("quantize_4bit", A.contiguous(), blocksize, quant_type)


@quantize_4bit.register_fake
def _(A, blocksize, quant_type):
    check_quantize_4bit(A, blocksize, quant_type)
    n = A.numel()
    return (A.new_empty((formats.packed_numel(n), 1), dtype=torch.uint8),
            A.new_empty((formats.num_blocks(n, blocksize),), dtype=torch.float32))


@torch.library.custom_op("qlora_kernels::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Decode to ``shape`` in ``dtype``: code[nibble] * absmax in fp32, then rounded."""
    check_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)
    return run("dequantize_4bit", packed.contiguous(), absmax.contiguous(), blocksize, quant_type,
               [int(s) for s in shape], dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, blocksize, quant_type, shape, dtype):
    check_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.custom_op("qlora_kernels::dequantize_4bit_out", mutates_args=("out",))
def dequantize_4bit_out(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                        out: torch.Tensor) -> None:
    """``dequantize_4bit`` into a caller-owned contiguous ``out`` (its shape and dtype)."""
    check_dequantize_4bit(packed, absmax, blocksize, quant_type, out.shape, out.dtype)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    run("dequantize_4bit_out", packed.contiguous(), absmax.contiguous(), blocksize, quant_type, out)


@dequantize_4bit_out.register_fake
def _(packed, absmax, blocksize, quant_type, out):
    check_dequantize_4bit(packed, absmax, blocksize, quant_type, out.shape, out.dtype)


def check_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
    if A.dtype != torch.float32 or code.dtype != torch.float32 or code.numel() != 256:
        raise TypeError("8-bit blockwise quantization takes float32 values and a 256-entry float32 map")
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")


@torch.library.custom_op("qlora_kernels::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with a sorted map (double quantization of absmax)."""
    check_blockwise(A, code, blocksize)
    return run("quantize_blockwise_8bit", A.contiguous(), code.contiguous(), blocksize)


@quantize_blockwise_8bit.register_fake
def _(A, code, blocksize):
    check_blockwise(A, code, blocksize)
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((formats.num_blocks(A.numel(), blocksize),))


@torch.library.custom_op("qlora_kernels::dequantize_blockwise_8bit", mutates_args=())
def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    if q.dtype != torch.uint8:
        raise TypeError(f"state.absmax must hold uint8 codes when nested, got {q.dtype}")
    if absmax.numel() != formats.num_blocks(q.numel(), blocksize):
        raise ValueError(
            f"state.state2.absmax has {absmax.numel()} entries; {q.numel()} codes with blocksize {blocksize}"
            f" need {formats.num_blocks(q.numel(), blocksize)}"
        )
    return run("dequantize_blockwise_8bit", q.contiguous(), absmax.float().contiguous(), code.float().contiguous(), blocksize)


@dequantize_blockwise_8bit.register_fake
def _(q, absmax, code, blocksize):
    return q.new_empty(q.shape, dtype=torch.float32)
