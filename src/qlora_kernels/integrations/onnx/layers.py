"""The model that is exported: every layer we know is swapped, in a copy of the model, for
a small module whose forward is what the ONNX graph will hold — a 4-bit base (MatMulBnb4,
MatMulNBits or a dense MatMul), and LoRA/DoRA adapters either as their own MatMul branch
(A and B kept as initializers named after the PEFT parameters) or merged into the base."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ... import functional
from ...nn import Linear4bit, LoraLinear
from . import contrib, ops  # noqa: F401  (ops registers qlora_kernels_onnx::matmul_nbits, which NBitsBase runs)
from .errors import FORMATS, ExportError  # noqa: F401  (FORMATS: the exporter reads layers.FORMATS)


@dataclass
class SwapReport:
    layers: int = 0           # base weights written in the chosen format
    dense: int = 0            # dense nn.Linear left as they are
    adapters: int = 0         # LoRA/DoRA adapters kept as branches
    merged: int = 0           # adapters merged into their base
    weight_error: float = 0.0  # max |W - W_exported| / max |W| over re-encoded weights
    notes: list = field(default_factory=list)


# The block sizes ONNX Runtime's com.microsoft.MatMulBnb4 runs (it refuses others at load);
# our own operators (ortops) take every blocksize of formats.BLOCKSIZES.
BNB4_BLOCK_SIZES = (16, 32, 64, 128, 256)


def _bnb4_refusal(where: str, size) -> ExportError:
    return ExportError(f"{where}: ONNX Runtime's MatMulBnb4 runs block sizes {BNB4_BLOCK_SIZES}, this layer has "
                       f"{size}; export with weight_format='nbits', with our operators (the GenAI export's "
                       f"custom_ops), or quantize with a blocksize up to 256")


def check_bnb4_block_sizes(proto) -> None:
    """Refuses a graph ONNX Runtime could not load (a MatMulBnb4 node of another block size),
    before anything is written."""
    for node in proto.graph.node:
        if node.op_type == "MatMulBnb4":
            size = next((a.i for a in node.attribute if a.name == "block_size"), None)
            if size not in BNB4_BLOCK_SIZES:
                raise _bnb4_refusal(node.name, size)


def check_bnb4_modules(model: nn.Module) -> None:
    """The same for a model about to be traced: its Bnb4Base layers become MatMulBnb4 nodes."""
    for name, m in model.named_modules():
        if isinstance(m, Bnb4Base) and m.blocksize not in BNB4_BLOCK_SIZES:
            raise _bnb4_refusal(name, m.blocksize)


class Bnb4Base(nn.Module):
    """x @ dequant(W)^T (+ bias) as one MatMulBnb4: our packed bytes and fp32 absmax."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                 in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.quant_type = blocksize, quant_type
        self.weight = nn.Parameter(packed.reshape(-1).contiguous(), requires_grad=False)
        self.absmax = nn.Parameter(absmax.float().reshape(-1).contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x):
        return torch.ops.qlora_kernels.linear_4bit(x, self.weight, self.absmax, self.blocksize, self.quant_type,
                                                   self.out_features, self.bias)


class NBitsBase(nn.Module):
    """x @ dequant(W)^T (+ bias) as one MatMulNBits (int4 symmetric, block 64)."""

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = W.shape
        B, scales = contrib.quantize_nbits(W)
        self.weight = nn.Parameter(B, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return contrib.dequantize_nbits(self.weight, self.scales, self.in_features)

    def forward(self, x):
        y = torch.ops.qlora_kernels_onnx.matmul_nbits(x, self.weight, self.scales, self.in_features,
                                                      self.out_features, contrib.NBITS_BLOCK)
        return y if self.bias is None else y + self.bias


class _Weight(nn.Module):
    """Holds one adapter matrix as ``.weight`` so its initializer carries PEFT's key. LoRA
    matrices are stored transposed (Aᵀ [in, r], Bᵀ [r, out]), the layout MatMul reads:
    a Transpose of an initializer would be folded by the exporter's optimizer into a new,
    anonymous initializer, and the adapter could no longer be found by name."""

    def __init__(self, w: torch.Tensor, transpose: bool = False):
        super().__init__()
        w = w.detach().float()
        self.weight = nn.Parameter((w.t() if transpose else w).contiguous().clone(), requires_grad=False)


class LoraBranch(nn.Module):
    """base(x) + Σ s·(x Aᵀ) Bᵀ; with DoRA (one adapter) m/‖W+sBA‖ · (x Wᵀ + s·B A x) + bias,
    the factor computed at export (it is a constant of the weights, DoRA §4.3) and stored
    as ``lora_magnitude_vector.<adapter>.weight`` (the factor, not PEFT's raw magnitude)."""

    def __init__(self, base: nn.Module, adapters: list, dora_factor: torch.Tensor | None):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({a: _Weight(A, transpose=True) for a, A, _, _ in adapters})
        self.lora_B = nn.ModuleDict({a: _Weight(B, transpose=True) for a, _, B, _ in adapters})
        self.scaling = {a: float(s) for a, _, _, s in adapters}
        self.lora_magnitude_vector = None
        if dora_factor is not None:
            self.lora_magnitude_vector = nn.ModuleDict({adapters[0][0]: _Weight(dora_factor)})

    def forward(self, x):
        if self.lora_magnitude_vector is None:
            y = self.base_layer(x)
            for a, s in self.scaling.items():
                y = y + (x @ self.lora_A[a].weight) @ self.lora_B[a].weight * s
            return y
        (a, s), = self.scaling.items()
        bias = self.base_layer.bias
        z = self.base_layer(x)
        if bias is not None:
            z = z - bias  # the base op adds its bias; DoRA scales the product without it
        z = z + (x @ self.lora_A[a].weight) @ self.lora_B[a].weight * s
        y = z * self.lora_magnitude_vector[a].weight
        return y if bias is None else y + bias


# ----------------------------------------------------------------------- the swap ----

def _dense_weight(base: nn.Module) -> torch.Tensor:
    return base.dequantize() if isinstance(base, Linear4bit) else base.weight.detach().float()


def _encode(W: torch.Tensor, bias, fmt: str, like: Linear4bit | None, report: SwapReport) -> nn.Module:
    """Write a dense weight W in the chosen format; ``like`` gives the 4-bit format it had."""
    if fmt == "fp32" or like is None:
        lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
        lin.weight = nn.Parameter(W.float().contiguous(), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return lin
    if fmt == "nbits":
        mod = NBitsBase(W, bias)
        back = mod.dequantize()
    else:
        packed, state = functional.quantize_4bit(W.float(), like.quant_type, like.blocksize)
        mod = Bnb4Base(packed, state.absmax, like.blocksize, like.quant_type, W.shape[1], W.shape[0], bias)
        back = functional.dequantize_4bit(packed, state)
    err = float((W - back).abs().max() / W.abs().max().clamp_min(1e-30))
    report.weight_error = max(report.weight_error, err)
    return mod


def export_base(base: nn.Module, fmt: str, report: SwapReport) -> nn.Module:
    """A Linear4bit in the chosen format (bnb4: its own bytes, nothing re-encoded); a dense
    nn.Linear stays dense in every format (the exporter changes no precision it was not asked to)."""
    if isinstance(base, Linear4bit):
        report.layers += 1
        if fmt == "bnb4":
            return Bnb4Base(base.weight.detach(), base.prepared().absmax.detach(), base.blocksize, base.quant_type,
                            base.in_features, base.out_features, base.bias)
        return _encode(base.dequantize(), base.bias, fmt, base, report)
    report.dense += 1
    return _encode(base.weight.detach().float(), base.bias, "fp32", None, report)


def _adapters(module: nn.Module, path: str) -> tuple[list, bool]:
    """[(name, A, B, scaling)] of the active, unmerged adapters of a LoRA layer, and whether
    it is DoRA."""
    if isinstance(module, LoraLinear):
        return [("default", module.lora_A.detach(), module.lora_B.detach(), module.scaling)], False
    if getattr(module, "merged", False):
        return [], False
    if getattr(module, "disable_adapters", False):
        return [], False
    active = [a for a in module.active_adapters if a in module.lora_A]
    for a in active:
        if module.lora_bias.get(a, False):
            raise ExportError(f"{path}: LoRA adapter {a!r} has lora_bias=True, which the exporter does not support")
    dora = [a for a in active if a in getattr(module, "lora_variant", {})] or \
        [a for a in active if a in getattr(module, "lora_magnitude_vector", {})]
    if dora and len(active) > 1:
        raise ExportError(f"{path}: a DoRA adapter exports only alone, but {active} are active")
    return [(a, module.lora_A[a].weight.detach(), module.lora_B[a].weight.detach(), module.scaling[a])
            for a in active], bool(dora)


def _dora_factor(module: nn.Module, base: nn.Module, adapter) -> torch.Tensor:
    from ...dora import weight_norm

    a, A, B, s = adapter
    norm = weight_norm(base, A, B, s)
    return (module.lora_magnitude_vector[a].weight.detach().float() / norm).reshape(-1)


def export_lora(module: nn.Module, path: str, base: nn.Module, fmt: str, merge: bool, report: SwapReport) -> nn.Module:
    adapters, dora = _adapters(module, path)
    if not adapters:
        return export_base(base, fmt, report)
    factor = _dora_factor(module, base, adapters[0]) if dora else None
    if not merge:
        report.adapters += len(adapters)
        return LoraBranch(export_base(base, fmt, report), adapters, factor)
    W = _dense_weight(base) + sum(s * (B.float() @ A.float()) for _, A, B, s in adapters)
    if factor is not None:
        W = factor.view(-1, 1) * W
    report.merged += len(adapters)
    like = base if isinstance(base, Linear4bit) else None
    if like is not None:
        report.layers += 1
    else:
        report.dense += 1
    return _encode(W, base.bias, fmt, like, report)


def _as_known_base(base: nn.Module) -> nn.Module | None:
    from ..peft import as_our_base

    try:
        return as_our_base(base)
    except ImportError:
        return base if (type(base) is nn.Linear or isinstance(base, Linear4bit)) else None


def _lora_layer_types() -> tuple:
    try:
        from peft.tuners.lora.layer import Linear as PeftLinear

        from ..peft import QKLoraLinear
        types = (LoraLinear, QKLoraLinear, PeftLinear)
        try:
            from peft.tuners.lora.bnb import Linear4bit as PeftBnb4

            types += (PeftBnb4,)
        except ImportError:
            pass
        return types
    except ImportError:
        return (LoraLinear,)


def _unknown(module: nn.Module) -> str | None:
    """Why the exporter cannot write this (not swapped) module, or None."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(module, BaseTunerLayer):
            return "a PEFT adapter layer of a kind the exporter does not know"
    except ImportError:
        pass
    for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t.dtype in (torch.uint8, torch.int8):
            return f"its {n!r} holds {t.dtype} data (a quantized weight of a kind the exporter does not know)"
    if type(module).__module__.startswith("qlora_kernels") and not type(module).__module__.startswith(__name__):
        return "a qlora_kernels layer the exporter does not know"
    return None


def swap(model: nn.Module, fmt: str, merge: bool) -> SwapReport:
    """Replace, in place (on a copy the caller made), every layer we know by its export
    module; raise ExportError naming the first module we cannot write."""
    report = SwapReport()
    lora_types = _lora_layer_types()
    todo = []
    handled: set = set()
    for path, module in model.named_modules():
        if any(path.startswith(h + ".") for h in handled):
            continue
        if isinstance(module, lora_types):
            base = module.base_layer if isinstance(module, LoraLinear) else module.get_base_layer()
            known = _as_known_base(base)
            if known is None:
                raise ExportError(f"{path}: the exporter does not know the LoRA base layer type "
                                  f"{type(base).__module__}.{type(base).__name__}")
            todo.append((path, lambda m=module, p=path, b=known: export_lora(m, p, b, fmt, merge, report)))
            handled.add(path)
        elif isinstance(module, Linear4bit) or (_as_known_base(module) is not None and type(module) is not nn.Linear):
            known = _as_known_base(module)
            todo.append((path, lambda b=known: export_base(b, fmt, report)))
            handled.add(path)
    for path, module in model.named_modules():
        if path in handled or any(path.startswith(h + ".") for h in handled):
            continue
        if type(module) is nn.Linear:
            report.dense += 1  # exported as it is: a MatMul on its fp32 weight
        why = _unknown(module)
        if why:
            raise ExportError(f"cannot export module {path or '<root>'} ({type(module).__module__}."
                              f"{type(module).__name__}): {why}")
    for path, make in todo:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make())
    return report
