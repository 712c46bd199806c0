"""Optimizers for the adapter parameters: ``AdamW``, a fused multi-tensor AdamW that is a
drop-in for ``torch.optim.AdamW`` (and a DeepSpeed client optimizer)."""
from .adamw import AdamW

__all__ = ["AdamW"]
