"""The torch side of the exported graph: an op for MatMulNBits weights (so the torch model
that is exported computes what ONNX Runtime will), and the translation of our ops into
com.microsoft nodes for the dynamo exporter's ``custom_translation_table``."""
from __future__ import annotations

import torch

from . import contrib


@torch.library.custom_op("qlora_kernels_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int,
                 block_size: int) -> torch.Tensor:
    """x @ dequant(B)^T for MatMulNBits int4 weights (zero point 8), fp32 arithmetic."""
    W = contrib.dequantize_nbits(B, scales, in_features)
    return (x.float() @ W.t()).to(x.dtype)


@matmul_nbits.register_fake
def _(x, B, scales, in_features, out_features, block_size):
    return x.new_empty((*x.shape[:-1], out_features))


def _static_k(x) -> int:
    k = x.shape[-1]
    k = getattr(k, "value", k)
    if not isinstance(k, int):
        raise ValueError(f"the feature dimension of a 4-bit layer's input must be static, got {k!r}")
    return k


def translation_table() -> dict:
    """{torch op overload: onnxscript function} for torch.onnx.export(dynamo=True)."""
    from onnxscript import opset18 as op

    bnb4, nbits = contrib.onnxscript_op("MatMulBnb4"), contrib.onnxscript_op("MatMulNBits")

    def linear_4bit(x, packed, absmax, blocksize: int, quant_type: str, out_features: int, bias=None):
        y = bnb4(x, packed, absmax, K=_static_k(x), N=out_features, block_size=blocksize,
                 quant_type=contrib.BNB4_QUANT_TYPE[quant_type])
        return y if bias is None else op.Add(y, bias)

    def nbits_linear(x, B, scales, in_features: int, out_features: int, block_size: int):
        return nbits(x, B, scales, K=in_features, N=out_features, bits=4, block_size=block_size, accuracy_level=0)

    return {torch.ops.qlora_kernels.linear_4bit.default: linear_4bit,
            torch.ops.qlora_kernels_onnx.matmul_nbits.default: nbits_linear}
