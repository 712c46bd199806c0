"""Shared by the ONNX export tests: models with adapters whose B is not zero (PEFT starts B
at zero, and a zero branch would prove nothing), ORT logits, and the 1e-4 bound."""
from __future__ import annotations

import torch

from qlora_kernels.integrations.onnx import contrib, verify

# The bound for bnb4 and fp32: ORT logits within 1e-4 of torch, relative to the
# largest logit (verify.errors' max_rel).
REL_TOL = 1e-4


def with_lora(model, targets, dora: bool = False, r: int = 4, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from qlora_kernels.integrations.peft import install

    install()
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=dora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm.eval()


def ort_logits(path, ids, mask=None):
    return verify.ort_logits(contrib.session(str(path)), ids, torch.ones_like(ids) if mask is None else mask)


def torch_logits(model, ids, mask=None):
    return verify.torch_logits(model, ids, torch.ones_like(ids) if mask is None else mask)
