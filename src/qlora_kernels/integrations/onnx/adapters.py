"""Swapping LoRA adapters in an exported file: the branches' A and B are initializers named
after the PEFT parameters (``<module>.lora_A.<adapter>.weight``), stored transposed."""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import ExportError


def _saved_key(name: str) -> str:
    # PEFT's adapter_model.safetensors drops the adapter name: ".lora_A.default.weight" -> ".lora_A.weight"
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)


def swap_adapters(src, dst, tensors: Mapping[str, torch.Tensor], overwrite: bool = False) -> int:
    """Write ``src`` with the given LoRA tensors (PEFT's shapes: A [r, in], B [out, r]; keys as
    in the model's state dict or in PEFT's saved adapter file) to ``dst``; returns how many
    initializers were replaced. Every lora_A/lora_B of the file must be given, with its shape.
    A file with several adapters needs the keys with adapter names (a saved file's keys have
    none, and would fill every adapter's branch). The scaling (lora_alpha / r) is the exported
    adapter's, a constant of the graph: an adapter trained with another lora_alpha or rsLoRA
    needs its B scaled by the ratio first, or a new export."""
    import onnx
    from onnx import numpy_helper

    from .exporter import check_path

    dst = check_path(dst, overwrite)
    proto = onnx.load(str(src))
    by_name = {}
    for init in proto.graph.initializer:
        if ".lora_A." in init.name or ".lora_B." in init.name:
            by_name[init.name] = init
    if not by_name:
        raise ExportError(f"{src}: no LoRA initializers (was it exported with merge_adapters=True?)")
    dora = [i.name for i in proto.graph.initializer if "lora_magnitude_vector." in i.name]
    if dora:
        # the stored factor m/||W + sBA|| belongs to the exported A and B: new ones need a new export
        raise ExportError(f"{src}: its adapters are DoRA ({dora[0]}): their magnitude factor depends on A and B, "
                          f"so swapping A and B alone would give wrong outputs; export again with the new adapter")
    given = {k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}
    branches_per_key: dict = {}
    for name in by_name:
        branches_per_key[_saved_key(name)] = branches_per_key.get(_saved_key(name), 0) + 1
    replaced = 0
    for name, init in by_name.items():
        t = given.get(name)
        if t is None and _saved_key(name) in given:
            if branches_per_key[_saved_key(name)] > 1:
                raise ExportError(f"{_saved_key(name)} has no adapter name, and {src} holds "
                                  f"{branches_per_key[_saved_key(name)]} adapters' branches for it: give the keys "
                                  f"with adapter names (the model's state dict), e.g. {name}")
            t = given[_saved_key(name)]
        if t is None:
            raise ExportError(f"no tensor given for {name} (or {_saved_key(name)})")
        want = tuple(reversed(init.dims))
        if tuple(t.shape) != want:
            raise ExportError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
        init.CopyFrom(numpy_helper.from_array(t.detach().float().t().contiguous().numpy(), name))
        replaced += 1
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")
    try:
        onnx.save(proto, str(tmp))
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return replaced
