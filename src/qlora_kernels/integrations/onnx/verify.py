"""Running the exported graph in ONNX Runtime beside the torch model: logits error and greedy
generation (a full-sequence forward per step: the graph has no KV cache)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from . import contrib


def torch_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out).float()


def ort_logits(sess, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    feeds = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": attention_mask.numpy().astype(np.int64)}
    return torch.from_numpy(sess.run(["logits"], feeds)[0])


def errors(ref: torch.Tensor, got: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """Max absolute error, and the same relative to the largest reference logit; with a mask,
    over the positions it keeps only (a padded query attends to nothing: torch and ONNX Runtime
    fill its logits differently, and neither value means anything)."""
    if attention_mask is not None:
        keep = attention_mask.bool()
        ref, got = ref[keep], got[keep]
    if ref.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0}
    diff = float((ref - got).abs().max())
    scale = float(ref.abs().max().clamp_min(1e-30))
    return {"max_abs": diff, "max_rel": diff / scale}


def greedy(logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
           new_tokens: int) -> torch.Tensor:
    """Greedy decoding of ``new_tokens`` tokens with a full forward of the whole sequence each step."""
    ids = input_ids
    for _ in range(new_tokens):
        nxt = logits_fn(ids, torch.ones_like(ids))[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, input_ids.shape[1]:]


def run(path: str, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    sess = contrib.session(path)
    return errors(torch_logits(model, input_ids, attention_mask), ort_logits(sess, input_ids, attention_mask),
                  attention_mask)
