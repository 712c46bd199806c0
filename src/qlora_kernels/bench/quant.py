"""Quantization cases: quantize_4bit / dequantize_4bit against bitsandbytes."""
from __future__ import annotations

import torch

from .. import functional
from .harness import Case


def _bnb():
    try:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as F

        return F
    except Exception:  # a peer that is not installed is simply not compared
        return None


def quant_cases(rows: int = 4096, cols: int = 4096, quant_type: str = "nf4", blocksize: int = 64) -> list[Case]:
    W = torch.randn(rows, cols)
    n = W.numel()
    shape = f"{rows}x{cols} {quant_type} bs{blocksize}"
    packed, state = functional.quantize_4bit(W, quant_type, blocksize)
    out = torch.empty(rows, cols)
    cases = [
        Case(f"quantize_4bit {shape}", "qlora-kernels", lambda: functional.quantize_4bit(W, quant_type, blocksize),
             True, n, "Gelem/s"),
        Case(f"dequantize_4bit {shape} -> fp32", "qlora-kernels", lambda: functional.dequantize_4bit(packed, state),
             True, n, "Gelem/s"),
        Case(f"dequantize_4bit {shape} -> fp32", "qlora-kernels (out=)",
             lambda: functional.dequantize_4bit(packed, state, out=out), True, n, "Gelem/s"),
    ]
    F = _bnb()
    if F is not None:
        qb, sb = F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type)
        cases += [
            Case(f"quantize_4bit {shape}", "bitsandbytes",
                 lambda: F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type), False, n, "Gelem/s"),
            Case(f"dequantize_4bit {shape} -> fp32", "bitsandbytes", lambda: F.dequantize_4bit(qb, sb), False, n,
                 "Gelem/s"),
        ]
    return cases
