"""A KV-cache decoder for ONNX Runtime GenAI (``onnxruntime_genai``): ``export_genai``
(exported by the parent package, loaded on first use) writes a model folder with the
decoder (GroupQueryAttention with a past/present cache, rotary embeddings, 4-bit layers as
MatMulBnb4 on our bytes or MatMulNBits), ``genai_config.json``, the tokenizer and
switchable LoRA adapter files; ``generate.generate`` runs it. See docs/onnx.md. Nothing is
imported here: the commands' parsers import ``generate`` without torch."""
