"""Switchable LoRA adapters for ONNX Runtime GenAI: one ``.onnx_adapter`` file per adapter
(ONNX Runtime's adapter format), holding for each adapted projection ``<path>.lora_A.weight``
= Aᵀ [in, r] and ``<path>.lora_B.weight`` = (s·B)ᵀ [r, out] (the scaling folded into B), the
names of the exported graph's adapter inputs. Adapters come from the PEFT model being
exported (every adapter it holds) or from PEFT adapter folders (``adapter_config.json`` +
``adapter_model.safetensors``, as ``qlora-kernels finetune`` and stock PEFT write them)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from .. import layers
from ..errors import GENAI_ADAPTER_SUFFIX as ADAPTER_SUFFIX
from ..errors import ExportError
from .arch import Arch, core_model
from .linears import lora_names

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _param_pair(path: str, A: torch.Tensor, B: torch.Tensor, scaling: float) -> dict:
    a_name, b_name = lora_names(path)
    return {a_name: A.detach().float().t().contiguous(), b_name: (B.detach().float() * float(scaling)).t().contiguous()}


def from_model(model: nn.Module, arch: Arch) -> dict[str, dict[str, torch.Tensor]]:
    """{adapter name: {input name: tensor}} for every (unmerged) adapter the model holds on
    the decoder's projections."""
    lm = core_model(model)
    lora_types = layers._lora_layer_types()
    found: dict = {}
    for i in range(arch.layers):
        for path in arch.projections(i).values():
            module = lm.get_submodule(path)
            if not isinstance(module, lora_types) or getattr(module, "merged", False):
                continue
            if isinstance(module, layers.LoraLinear):
                found.setdefault("default", {}).update(_param_pair(path, module.lora_A, module.lora_B, module.scaling))
                continue
            for name in module.lora_A:
                if name in getattr(module, "lora_magnitude_vector", {}) or \
                        name in getattr(module, "lora_variant", {}):
                    raise ExportError(f"{path}: adapter {name!r} is DoRA, which ONNX Runtime GenAI cannot switch; "
                                      "export it merged (merge_adapters=True)")
                if module.lora_bias.get(name, False):
                    raise ExportError(f"{path}: adapter {name!r} has lora_bias=True, which the export does not support")
                found.setdefault(name, {}).update(_param_pair(path, module.lora_A[name].weight,
                                                              module.lora_B[name].weight, module.scaling[name]))
    return found


def from_folder(folder, arch: Arch) -> dict[str, torch.Tensor]:
    """The adapter input tensors of a PEFT adapter folder."""
    from safetensors.torch import load_file

    d = Path(folder)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (d / f).is_file():
            raise ExportError(f"adapter {d}: no {f} in the folder")
    cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"adapter {d}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    if cfg.get("use_dora"):
        raise ExportError(f"adapter {d}: DoRA adapters cannot be switched in ONNX Runtime GenAI; merge it instead")
    if cfg.get("lora_bias"):
        raise ExportError(f"adapter {d}: lora_bias=True is not supported")
    tensors = load_file(str(d / "adapter_model.safetensors"))
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    pairs: dict = {}
    for key, t in tensors.items():
        m = pattern.match(key)
        if m is None:
            raise ExportError(f"adapter {d}: tensor {key} is not a LoRA A/B weight (only LoRA on linear layers "
                              "is exported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = (key, t)
    out = {}
    ranks = cfg.get("rank_pattern") or {}
    alphas = cfg.get("alpha_pattern") or {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ExportError(f"adapter {d}: {path} has lora_{''.join(sorted(set('AB') - set(ab)))} missing")
        rr = next((int(v) for k, v in ranks.items() if _pattern_matches(k, path)), r)
        aa = next((float(v) for k, v in alphas.items() if _pattern_matches(k, path)), alpha)
        scaling = aa / math.sqrt(rr) if cfg.get("use_rslora") else aa / rr
        out.update(_param_pair(path, ab["A"][1], ab["B"][1], scaling))
        out[f"{path}.__keys__"] = (ab["A"][0], ab["B"][0])  # for error messages; dropped by check()
    return out


def _pattern_matches(key: str, path: str) -> bool:
    """PEFT's rule for rank_pattern / alpha_pattern keys (peft.utils.other.get_pattern_key):
    the key is a regex matched against the end of the module name at a dot boundary. A plain
    ``path.endswith(key)`` misses regex keys (``layers\\.1\\..*``) and gives such modules the
    default rank or alpha, i.e. a wrong scaling folded into B."""
    return re.match(rf"(.*\.)?({key})$", path) is not None


def check(name: str, params: dict, shapes: dict[str, tuple[int, int]], source: str) -> dict[str, torch.Tensor]:
    """Refuse an adapter that does not fit the exported base, naming the tensor."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ExportError(f"adapter name {name!r} must be letters, digits, '_', '-' or '.' (it names a file)")
    keys = {k[:-len(".__keys__")]: v for k, v in params.items() if k.endswith(".__keys__")}
    clean = {k: v for k, v in params.items() if not k.endswith(".__keys__")}
    if not clean:
        raise ExportError(f"adapter {name!r} ({source}) has no LoRA tensors on the decoder's projections")
    for in_name in clean:
        path = in_name.rsplit(".lora_", 1)[0]
        a_key, b_key = keys.get(path, lora_names(path))
        if path not in shapes:
            raise ExportError(f"adapter {name!r} ({source}): tensor {a_key} targets {path}, which is not a "
                              "projection of the exported decoder")
        k, n = shapes[path]
        A, B = clean[lora_names(path)[0]], clean[lora_names(path)[1]]
        if A.shape[0] != k or B.shape[1] != n or A.shape[1] != B.shape[0]:
            raise ExportError(f"adapter {name!r} ({source}): tensor {a_key} / {b_key} is for a [{B.shape[1]} x "
                              f"{A.shape[0]}] layer (rank {A.shape[1]} / {B.shape[0]}), but the base's {path} is "
                              f"[{n} x {k}]: an adapter for another base")
    return clean


def write(params: dict[str, torch.Tensor], path: Path) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v.numpy()) for k, v in params.items()})
    fmt.export_adapter(str(path))
