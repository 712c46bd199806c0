"""A KV-cache decoder for ONNX Runtime GenAI (``onnxruntime_genai``): ``export_genai`` writes
a model folder with the decoder (GroupQueryAttention with a past/present cache, rotary
embeddings, 4-bit layers as MatMulBnb4 on our bytes or MatMulNBits), ``genai_config.json``,
the tokenizer and switchable LoRA adapter files; ``generate`` runs it. See docs/onnx.md."""
from __future__ import annotations

import importlib

# Loaded on first use (PEP 562): the commands' parsers import this package without torch.
_API = {"GenaiExportResult": "export", "export_genai": "export", "generate": "generate", "Generation": "generate"}


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GenaiExportResult", "Generation", "export_genai", "generate"]
