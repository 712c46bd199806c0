# How 4-bit layers are written: MatMulBnb4 with our bytes, re-quantized MatMulNBits, or fp32.
FORMATS = ("bnb4", "nbits", "fp32")


class ExportError(Exception):
    """The model or the arguments cannot be exported; the message names the module or argument."""

# ONNX Runtime's adapter file format, as ONNX Runtime GenAI loads it (og.Adapters.load).
GENAI_ADAPTER_SUFFIX = ".onnx_adapter"
