"""SmolLM2-135M-Instruct with LoRA (r=16 on every projection) on its NF4 base, served three
ways on the same token ids: our torch path (Linear4bit + the fused LoRA op) and ONNX
Runtime on the file export() wrote, with bnb4 (MatMulBnb4) and nbits (MatMulNBits) base
weights, adapters as MatMul branches. Two shapes: a 128-token prompt, and a single-token
step. The graph has no KV cache, so the step is a forward of a 1-token sequence on both
sides: it measures the per-token weight traffic of decoding (every weight read once for
one token), not attention over a long context."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .harness import Case
from ..finetune.model import LLAMA_TARGETS as LLAMA  # every Llama projection


def random_lora(model, targets, r: int = 16, dora: bool = False, std: float = 0.01, seed: int = 0):
    """PEFT LoRA (or DoRA) on ``targets`` with B drawn at random: PEFT starts B at zero, and
    a zero branch would be neither measured nor tested. Returns the PEFT model in eval mode."""
    from peft import LoraConfig

    from ..integrations.peft import get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), use_dora=dora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return pm.eval()


def smollm2_lora(r: int = 16):
    """SmolLM2 quantized to NF4 with our layers, with LoRA adapters on every projection."""
    from .. import quantize_model
    from ..finetune.smollm2 import load_smollm2

    return random_lora(quantize_model(load_smollm2(), skip=("lm_head",)), LLAMA, r)


def onnx_cases(formats=("bnb4", "nbits"), prompt: int = 128, workdir: str | None = None) -> list[Case]:
    from ..integrations.onnx import contrib, export, verify

    model = smollm2_lora()
    d = Path(workdir or tempfile.mkdtemp(prefix="qk-bench-onnx-"))
    g = torch.Generator().manual_seed(1)
    inputs = {t: torch.randint(1, 49152, (1, t), generator=g) for t in (prompt, 1)}
    sessions = {}
    for fmt in formats:
        path = d / f"smollm2-lora-{fmt}.onnx"
        res = export(model, path, example_inputs=inputs[prompt][:, :8], weight_format=fmt, overwrite=True, log=None)
        sessions[fmt] = (contrib.session(str(path), spinning=True), res)
    cases = []
    for t, label in ((prompt, f"{prompt}-token prompt"), (1, "single-token step (1-token forward, no KV cache)")):
        ids = inputs[t]
        mask = torch.ones_like(ids)
        group = f"SmolLM2-135M + LoRA r=16, {label}"
        cases.append(Case(group, "qlora-kernels torch (NF4 Linear4bit, fused LoRA)",
                          lambda ids=ids, mask=mask: verify.torch_logits(model, ids, mask), True, t, "tokens/s"))
        for fmt, (sess, res) in sessions.items():
            op = {"bnb4": "MatMulBnb4 NF4", "nbits": "MatMulNBits int4"}.get(fmt, fmt)
            cases.append(Case(group, f"ONNX Runtime {op} (exported, adapters as branches)",
                              lambda s=sess, ids=ids, mask=mask: verify.ort_logits(s, ids, mask), False, t,
                              "tokens/s", {"weight_error": res.weight_error}))
    return cases
