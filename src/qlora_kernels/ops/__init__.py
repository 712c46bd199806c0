"""Every ``torch.ops.qlora_kernels.*`` op, declared once: schema, fake implementation,
argument checks (``checks``, the one copy) and autograd. Importing this package declares
them all; the kernels behind them come from the selected backend (``..backends``).

    quant.py   quantize/dequantize 4-bit, blockwise 8-bit (absmax double quantization)
    linear.py  linear_4bit (+ int8 arithmetic), its input gradient, the LoRA ops
    loss.py    linear_cross_entropy (fused output head + loss)
    norm_act.py  rms_norm, swiglu (fused RMSNorm and SiLU-gated product) and their backward
    attention.py causal_attention (a decoder's training attention) and its backward
    rope.py    rope (rotary position embedding of queries and keys) and its backward
    eager.py   each op's autograd as an autograd.Function, for plain eager calls (no dispatcher)
"""
from . import attention, linear, loss, norm_act, quant, rope  # noqa: F401  (declaring is the import's purpose)
