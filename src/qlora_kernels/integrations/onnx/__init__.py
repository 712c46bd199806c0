"""Export a model (plain, quantized with our layers, or a PEFT model on them) to ONNX for
ONNX Runtime: 4-bit weights as MatMulBnb4 (the exact NF4/FP4 bytes), re-quantized to
MatMulNBits, or dequantized to fp32; LoRA/DoRA adapters as their own MatMul branches or
merged. See docs/onnx.md.

The graph follows Hugging Face Optimum's decoder convention without a KV cache: inputs
``input_ids`` and ``attention_mask`` (int64, [batch_size, sequence_length], both dynamic),
output ``logits`` [batch_size, sequence_length, vocab]."""
from __future__ import annotations

import importlib

from .errors import ExportError

# Loaded on first use (PEP 562): the command's parser imports this package without torch.
_API = {"ExportResult": "exporter", "export": "exporter", "swap_adapters": "adapters",
        "export_genai": "genai.export", "GenaiExportResult": "genai.export"}


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ExportError", "ExportResult", "GenaiExportResult", "export", "export_genai", "swap_adapters"]
