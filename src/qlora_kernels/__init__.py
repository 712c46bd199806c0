"""qlora-kernels: LoRA/QLoRA/DoRA kernels for CPUs and FPGAs.

NF4/FP4 formats bit-exact with bitsandbytes; ops declared with torch.library and run on a
selectable backend (``reference``: pure torch, ``cpu``: the C++ extension, ``opencl``,
``hls``).

The public names below load on first use (PEP 562), so that the ``qlora-kernels`` command
starts without torch (it sets the OpenMP wait policy before torch's OpenMP runtime loads).
``torch.ops.qlora_kernels.*`` are registered by the first use of any of them, by importing
``qlora_kernels.functional`` (or any module that computes), or at ``import qlora_kernels``
when torch is already imported.
"""
from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

from . import _env

_env.check_at_import()  # an unknown QLORA_KERNELS_* value fails here, naming the variable

# public name -> the module that defines it
_API = {
    "QuantState": "formats",
    "available_backends": "backends",
    "get_backend": "backends",
    "set_backend": "backends",
    "unavailable_reason": "backends",
    "use_backend": "backends",
    "quantize_model": "convert",
    "causal_attention": "functional",
    "dequantize_4bit": "functional",
    "linear_4bit": "functional",
    "linear_cross_entropy": "functional",
    "lora_linear": "functional",
    "lora_linear_4bit": "functional",
    "quantize_4bit": "functional",
    "rms_norm": "functional",
    "rope": "functional",
    "swiglu": "functional",
    "prepare_4bit": "prepared",
    "patch_peft_model": "integrations.peft",
}
_SUBMODULES = ("backends", "bench", "cli", "convert", "finetune", "formats", "fpga", "functional", "integrations",
               "nn", "opencl", "ops", "optim", "peak", "prepared")


def __getattr__(name: str):
    if name in _API:
        importlib.import_module(".functional", __name__)  # the ops every public function runs
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API) | set(_SUBMODULES))


if "torch" in sys.modules:  # torch is loaded already: register the ops now, as an eager import would
    importlib.import_module(".functional", __name__)

__all__ = sorted(_API)
