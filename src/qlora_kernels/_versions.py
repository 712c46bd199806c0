"""What marks a tensor as edited, for the caches that keep something derived from one (a
prepared weight, a device copy, the native decode plan)."""
from __future__ import annotations

import torch


def version_of(t: torch.Tensor) -> int:
    """t's version counter; -1 for an inference tensor (made under torch.inference_mode),
    which has none: its pointer and size alone mark a change, as for edits through .data.
    Under torch.compile the counter itself (dynamo traces it, and refuses is_inference())."""
    if torch.compiler.is_compiling():
        return t._version
    return -1 if t.is_inference() else t._version
