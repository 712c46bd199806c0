"""Shared by the ONNX export tests: models with adapters whose B is not zero (PEFT starts B
at zero, and a zero branch would prove nothing), ORT logits, and the 1e-4 bound."""
from __future__ import annotations

import torch

from qlora_kernels.integrations.onnx import contrib, verify

# The bound for bnb4 and fp32: ORT logits within 1e-4 of torch, relative to the
# largest logit (verify.errors' max_rel).
REL_TOL = 1e-4


def with_lora(model, targets, dora: bool = False, r: int = 4, seed: int = 0):
    from qlora_kernels.bench.onnx import random_lora

    return random_lora(model, targets, r=r, dora=dora, std=0.05, seed=seed)


def ort_logits(path, ids, mask=None):
    return verify.ort_logits(contrib.session(str(path)), ids, torch.ones_like(ids) if mask is None else mask)


def torch_logits(model, ids, mask=None):
    return verify.torch_logits(model, ids, torch.ones_like(ids) if mask is None else mask)
