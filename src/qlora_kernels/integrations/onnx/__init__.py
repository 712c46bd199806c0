"""Export a model (plain, quantized with our layers, or a PEFT model on them) to ONNX for
ONNX Runtime: 4-bit weights as MatMulBnb4 (the exact NF4/FP4 bytes), re-quantized to
MatMulNBits, or dequantized to fp32; LoRA/DoRA adapters as their own MatMul branches or
merged. See docs/onnx.md.

The graph follows Hugging Face Optimum's decoder convention without a KV cache: inputs
``input_ids`` and ``attention_mask`` (int64, [batch_size, sequence_length], both dynamic),
output ``logits`` [batch_size, sequence_length, vocab]."""
from __future__ import annotations

from .adapters import swap_adapters
from .errors import ExportError
from .exporter import ExportResult, export

__all__ = ["ExportError", "ExportResult", "export", "swap_adapters"]
