"""qlora-kernels: LoRA/QLoRA/DoRA kernels for CPUs and FPGAs.

NF4/FP4 formats bit-exact with bitsandbytes; ops declared with torch.library and run on a
selectable backend (``reference``: pure torch, ``cpu``: the C++ extension).
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import _env

_env.check_at_import()  # an unknown QLORA_KERNELS_* value fails here, naming the variable

from . import _ops, _ops_linear, _ops_loss  # noqa: F401  (register torch.ops.qlora_kernels.*)
from .backends import available_backends, get_backend, set_backend, unavailable_reason, use_backend
from . import nn  # noqa: F401  (qlora_kernels.nn)
from .formats import QuantState
from .nn import quantize_model
from .functional import (dequantize_4bit, linear_4bit, linear_cross_entropy, lora_linear, lora_linear_4bit,
                         quantize_4bit)



def patch_peft_model(peft_model):
    """See qlora_kernels.integrations.peft.patch_peft_model (imports PEFT on first use)."""
    from .integrations.peft import patch_peft_model as _patch

    return _patch(peft_model)


__all__ = [
    "patch_peft_model",
    "QuantState",
    "available_backends",
    "dequantize_4bit",
    "get_backend",
    "linear_4bit",
    "linear_cross_entropy",
    "lora_linear",
    "lora_linear_4bit",
    "quantize_4bit",
    "quantize_model",
    "set_backend",
    "unavailable_reason",
    "use_backend",
]
