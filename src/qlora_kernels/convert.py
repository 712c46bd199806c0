"""Whole-model conversion: every ``nn.Linear`` of a model to a 4-bit :class:`~qlora_kernels.nn.Linear4bit`.
Kept apart from nn.py because it can also fuse a transformers model's loss
(integrations.hf_loss, which builds on nn.py); it changes nothing outside the model."""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from . import formats
from .nn import Linear4bit


def _linear_like(m: nn.Module) -> bool:
    """A linear layer quantize_model does not convert: an nn.Linear subclass, or transformers'
    Conv1D (GPT-2's projections)."""
    w = getattr(m, "weight", None)
    if not (isinstance(w, torch.Tensor) and w.is_floating_point()):  # already quantized (bitsandbytes')
        return False
    return (isinstance(m, nn.Linear) and type(m) is not nn.Linear) or type(m).__name__ == "Conv1D"


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)


def quantize_model(model: nn.Module, quant_type: str = "nf4", blocksize: int = formats.DEFAULT_BLOCKSIZE,
                   double_quant: bool = False, skip: Iterable[str] = ("lm_head",), fuse_loss: bool = False,
                   fuse_norm_mlp: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (except names in ``skip``, and a layer whose
    weight another module shares, such as a head tied to the embedding) by a
    :class:`Linear4bit`, in place; returns the model (a bare ``nn.Linear`` is returned as a
    new Linear4bit). ``fuse_loss``: on a transformers
    causal LM, also compute the training loss with the fused output head + cross-entropy
    (integrations.hf_loss.fuse_loss: no [tokens, vocab] logits, and ``logits=None`` in the
    output of training-mode forwards that are given labels). ``fuse_norm_mlp``: also run the
    model's RMSNorms and SiLU-gated MLPs on the fused CPU kernels (integrations.hf_fuse.fuse_layers:
    same parameters and state-dict keys; other layers are left as they are) and its attention
    on the fused causal attention (integrations.hf_attention)."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)  # "lm_head" is one name, not seven letters
    if type(model) is nn.Linear:  # a bare layer: there is no parent to put the new one in
        return model if _skipped("", skip) else Linear4bit.from_linear(model, quant_type, blocksize, double_quant)
    # Every name of a layer (a layer shared by two parents is one Linear4bit under both), and
    # never a layer whose weight another kind of module uses too: a head tied to the input
    # embedding stays dense, as transformers keeps it out of bitsandbytes (quantized, it
    # would be untied, and a later tie_weights() would put the float embedding in its place).
    # (by identity: a tied weight is the very same Parameter, on a meta device too)
    others = [p for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)]
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if type(m) is nn.Linear and not _skipped(name, skip) and not any(m.weight is p for p in others)]
    made: dict[nn.Module, Linear4bit] = {}  # modules hash by identity: one Linear4bit per layer
    for name, lin in targets:
        if lin not in made:
            made[lin] = Linear4bit.from_linear(lin, quant_type, blocksize, double_quant)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, made[lin])
    left = sorted({type(m).__name__ for name, m in model.named_modules() if _linear_like(m) and not _skipped(name, skip)
                   and "Router" not in type(m).__name__})
    if left:
        # their math may differ from nn.Linear's (transformers' Conv1D stores the weight
        # transposed; FalconLinear has its own forward): not converted, and said so
        warnings.warn(f"quantize_model left layers of {', '.join(left)} dense: only plain torch.nn.Linear layers are "
                      "converted", stacklevel=2)
    if fuse_loss:
        from .integrations.hf_loss import fuse_loss as _fuse

        _fuse(model)
    if fuse_norm_mlp:
        from .integrations.hf_fuse import fuse_layers

        fuse_layers(model)
    return model
