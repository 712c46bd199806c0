"""PEFT integration: LoRA and DoRA layers for qlora_kernels' Linear4bit (and dense
nn.Linear) that PEFT creates itself, and patch_peft_model for models PEFT already built.

Supported PEFT: 0.21 (tested with 0.21.2; its layer constructor takes the LoraConfig and
variants resolve through ``resolve_lora_variant(config=...)``). Earlier releases pass the
adapter options as keyword arguments and are not supported.

PEFT reaches our layers through its own custom-module registration: ``register(config)``
(``LoraConfig._register_custom_module({Linear4bit: QKLoraLinear})``), which
``get_peft_model`` and ``from_pretrained`` here do for you. Nothing is patched: a
``LoraConfig`` that was not registered gets PEFT's own layers, and importing or quantizing
changes nothing in PEFT."""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from ..nn import Linear4bit
from .. import dora

try:
    from peft.tuners.lora import LoraConfig, LoraLayer
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.layer import LoraVariant
    from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError as e:  # pragma: no cover - exercised only without peft
    raise ImportError("qlora_kernels.integrations.peft needs `pip install peft` (qlora-kernels[hf])") from e

_MERGE_WARNING = "Merge lora module to 4-bit linear may get different generations due to rounding errors."
_UNMERGE_WARNING = "Unmerge lora module to 4-bit linear may get different generations due to rounding errors."


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _lora_product(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling · B A x alone (rank r: small), x in the adapter's dtype as PEFT's Linear has it."""
    return F.linear(F.linear(x.to(A.dtype), A), B) * scaling


def _fused_lora(base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                bias: Optional[torch.Tensor], p: float, training: bool) -> torch.Tensor:
    if isinstance(base, Linear4bit):
        compute = getattr(base, "compute", "fp32")
        if compute != "fp32":
            # compute="int8" has no fused LoRA kernel: the base product at the layer's compute, as
            # its own forward and the exported MatMul4bitInt8 give it, and the LoRA product apart
            xd = F.dropout(x, p, training) if training and p > 0 else x
            lora = _lora_product(xd, A, B, scaling)
            return functional.linear_4bit(x, base.prepared(), None, bias, compute=compute) + lora.to(x.dtype)
        return functional.lora_linear_4bit(x, base.prepared(), None, A, B, scaling, bias, p, training)
    return functional.lora_linear(x, base.weight, A, B, scaling, bias, p, training)


class DoraVariant(LoraVariant):
    """DoRA on our layers: the magnitude lives in PEFT's DoraLinearLayer (same parameter,
    same saved key ``lora_magnitude_vector``); the norm comes from qlora_kernels.dora
    and the LoRA product from the fused op."""

    @staticmethod
    def init(module: "QKLoraLinear", adapter_name: str, **kwargs: Any) -> None:
        if not module.lora_magnitude_vector:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        layer = DoraLinearLayer(fan_in_fan_out=False)
        norm = dora.weight_norm(module.get_base_layer(), module.lora_A[adapter_name].weight,
                                module.lora_B[adapter_name].weight, module.scaling[adapter_name])
        layer.weight = nn.Parameter(norm, requires_grad=True)
        module.lora_magnitude_vector[adapter_name] = layer

    @staticmethod
    def _factor(module: "QKLoraLinear", adapter: str, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """m / ‖W + sBA‖ per output row; the norm of ``weight`` (dense) in place of the base's."""
        A, B, s = module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter]
        norm = dora.weight_norm(module.get_base_layer(), A, B, s) if weight is None else dora.dense_weight_norm(
            weight, A, B, s)
        return module.lora_magnitude_vector[adapter].weight / norm

    @staticmethod
    def merge_safe(module: "QKLoraLinear", active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        # The norm is the one forward uses: of the base without the adapters merged before this
        # one (orig_weight holds them), as PEFT takes it (_unmerged_base_weight).
        unmerged = module._unmerged_weight() if module.merged_adapters else None
        factor = DoraVariant._factor(module, active_adapter, unmerged).detach()
        module._cache_store(f"{active_adapter}-dora_factor", factor)
        return factor.view(-1, 1) * (orig_weight + module.get_delta_weight(active_adapter))

    @staticmethod
    def merge_unsafe(module: "QKLoraLinear", active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = DoraVariant.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def cached_factor(module: "QKLoraLinear", adapter: str) -> torch.Tensor:
        """The factor a merge used: ours, or from the norm PEFT's own DoRA merge cached (a model
        PEFT merged before patch_peft_model)."""
        if f"{adapter}-dora_factor" in module._caches:
            return module._caches[f"{adapter}-dora_factor"]
        return (module.lora_magnitude_vector[adapter].weight / module._caches[f"{adapter}-weight_norm"]).detach()

    @staticmethod
    def taken_out(module: "QKLoraLinear", adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with the merged adapter taken out: weight / factor - s·BA."""
        return weight / DoraVariant.cached_factor(module, adapter).view(-1, 1) - module.get_delta_weight(adapter)

    @staticmethod
    def unmerge(module: "QKLoraLinear", active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        w = DoraVariant.taken_out(module, active_adapter, orig_weight)
        module._caches.pop(f"{active_adapter}-dora_factor", None)
        module._caches.pop(f"{active_adapter}-weight_norm", None)
        return w

    @staticmethod
    def forward(module: "QKLoraLinear", active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        """result + the DoRA correction, PEFT's formula: (m/‖W+sBA‖ − 1)·base + (m/‖W+sBA‖)·s·B A x_d.
        With dropout in training, base = x_d Wᵀ (x_d = dropout(x)); otherwise base = result − bias,
        which holds the adapters before this one too (PEFT scales them as well)."""
        base = module.get_base_layer()
        A, B = module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight
        ms = DoraVariant._factor(module, active_adapter)
        dropout = module.lora_dropout[active_adapter]
        if module.training and _dropout_p(dropout) > 0:
            xd = dropout(x)
            plain = functional.linear_4bit(xd, base.prepared()) if isinstance(base, Linear4bit) \
                else F.linear(xd, base.weight)
        else:
            xd = x
            plain = result - base.bias if base.bias is not None else result
        lora = _lora_product(xd, A, B, module.scaling[active_adapter])
        # the factor is fp32: back to the layer's dtype, as PEFT's DoRA returns it
        return (result + (ms - 1) * plain + ms * lora).to(result.dtype)


class QKLoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA/DoRA layer over a qlora_kernels Linear4bit or a dense nn.Linear, running
    the fused ops whenever one plain adapter (or one DoRA adapter) is active."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # PEFT's feature probe does not know Linear4bit and says so; the sizes are set below.
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraLayer.__init__(self, base_layer)
        base = self.get_base_layer()
        if not isinstance(base, (Linear4bit, nn.Linear)):
            raise TypeError(f"QKLoraLinear wraps Linear4bit or nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> Optional[LoraVariant]:
        if getattr(config, "alora_invocation_tokens", None) is not None or getattr(config, "arrow_config", None):
            raise ValueError(f"{type(self).__name__} supports LoRA and DoRA only")
        return DoraVariant() if config.use_dora else None

    # -- merging: dequantize, add, requantize (with PEFT's warning) -------------------------
    def _base_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        return base.dequantize() if isinstance(base, Linear4bit) else base.weight.data

    def _set_base_weight(self, w: torch.Tensor) -> None:
        base = self.get_base_layer()
        if isinstance(base, Linear4bit):
            s = base.quant_state
            packed, state = functional.quantize_4bit(w.float(), s.quant_type, s.blocksize, s.nested)
            base.weight = nn.Parameter(packed, requires_grad=False)
            base.quant_state = state
        else:
            base.weight.data = w.to(base.weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        quantized = isinstance(self.get_base_layer(), Linear4bit)
        for a in adapter_names or []:
            if a not in self.lora_A:
                continue
            if quantized:
                warnings.warn(_MERGE_WARNING)
            w = self._base_weight().clone()
            w = self.lora_variant[a].merge_safe(self, a, w) if a in self.lora_variant else w + self.get_delta_weight(a)
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {a} seems to be broken")
            if self.lora_bias[a]:
                if self.get_base_layer().bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has "
                                       "no bias.")
                # forward scales the adapter's bias with its product: so does the merge (PEFT's Linear)
                self.get_base_layer().bias.data += self.lora_B[a].bias * self.scaling[a]
            self._set_base_weight(w)
            self.merged_adapters.append(a)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        quantized = isinstance(self.get_base_layer(), Linear4bit)
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            if a not in self.lora_A:
                continue
            if quantized:
                warnings.warn(_UNMERGE_WARNING)
            w = self._base_weight()
            w = self.lora_variant[a].unmerge(self, a, w) if a in self.lora_variant else w - self.get_delta_weight(a)
            self._set_base_weight(w)
            if self.lora_bias[a]:
                self.get_base_layer().bias.data -= self.lora_B[a].bias * self.scaling[a]

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight with the merged adapters taken out, computed on a copy (PEFT's
        _unmerged_base_weight unmerges and merges again, which on a 4-bit base quantizes twice)."""
        w = self._base_weight().clone()
        for a in reversed(self.merged_adapters):
            if a not in self.lora_A:
                continue
            w = DoraVariant.taken_out(self, a, w) if a in self.lora_variant else w - self.get_delta_weight(a)
        return w

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) == 1 and not self.lora_bias[active[0]]:
            a = active[0]
            A, B, s, p = self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a], _dropout_p(self.lora_dropout[a])
            if a not in self.lora_variant:
                return _fused_lora(base, x, A, B, s, base.bias, p, self.training)
            if p == 0.0 or not self.training:
                # DoRA without dropout collapses to m/‖W+sBA‖ · (x Wᵀ + s·B A x) + bias: one fused
                # LoRA product, the norm a constant (DoRA §4.3).
                y = (DoraVariant._factor(self, a) * _fused_lora(base, x, A, B, s, None, 0.0, False)).to(x.dtype)
                return y + base.bias if base.bias is not None else y
        result = base(x, *args, **kwargs)
        result_dtype = result.dtype
        for a in active:
            if a in self.lora_variant:
                result = self.lora_variant[a].forward(self, active_adapter=a, x=x, result=result)
            else:  # as PEFT's Linear: x in the adapter's dtype (fp32 adapters on a bf16 model), back after
                xa = x.to(self.lora_A[a].weight.dtype)
                result = result + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](xa))) * self.scaling[a]
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "qlora_kernels." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """PEFT's own custom-module registration (``LoraConfig._register_custom_module``, PEFT's
    first-match dispatcher): PEFT then wraps every qlora_kernels ``Linear4bit`` it targets
    with this config in ``QKLoraLinear``, the fused LoRA/DoRA layer. Returns ``config``.
    Nothing global changes: a config that was not registered gets PEFT's own layers."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({Linear4bit: QKLoraLinear})
    return config


def get_peft_model(model: nn.Module, config: LoraConfig, *args, **kwargs):
    """``peft.get_peft_model`` with ``config`` registered first (see ``register``)."""
    import peft

    return peft.get_peft_model(model, register(config), *args, **kwargs)


def from_pretrained(model: nn.Module, model_id, adapter_name: str = "default", **kwargs):
    """``peft.PeftModel.from_pretrained`` for a LoRA adapter saved by PEFT (ours or stock),
    with its config registered (see ``register``), so the adapter lands on our fused layers."""
    from peft import PeftConfig, PeftModel

    config = kwargs.pop("config", None) or PeftConfig.from_pretrained(str(model_id))
    if not isinstance(config, LoraConfig):
        raise TypeError(f"model_id: {model_id} holds a {type(config).__name__}, not a LoRA adapter")
    return PeftModel.from_pretrained(model, model_id, adapter_name=adapter_name, config=register(config), **kwargs)


def as_our_base(base: nn.Module) -> Optional[nn.Module]:
    """Our Linear4bit holding a bitsandbytes Linear4bit's very bytes and state, the dense
    nn.Linear as it is, or None for anything else."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit):
        from ..formats import QuantState

        w = base.weight
        if not getattr(w, "bnb_quantized", True) or w.quant_state is None:
            raise ValueError(f"{type(base).__name__}: the bitsandbytes weight is not quantized yet")
        ours = Linear4bit.__new__(Linear4bit)
        nn.Module.__init__(ours)
        ours.in_features, ours.out_features = base.in_features, base.out_features
        ours.compute_dtype = None
        ours.weight = nn.Parameter(w.data.view(torch.uint8).reshape(-1, 1), requires_grad=False)
        ours.quant_state = QuantState.from_dict(w.quant_state.as_dict(packed=True))
        ours._prepared = None
        ours.bias = base.bias
        return ours
    if type(base) is nn.Linear or isinstance(base, Linear4bit):
        return base
    return None


def patch_peft_model(peft_model: nn.Module) -> nn.Module:
    """Replace, in place, PEFT's LoRA/DoRA layers on bitsandbytes Linear4bit and on dense
    nn.Linear bases by QKLoraLinear (the same bytes, state and adapter tensors: nothing is
    copied or re-initialised), so training and saving go on as before; returns the model."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    targets = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, QKLoraLinear):
            base = as_our_base(module.get_base_layer())
            # DoRA is the one variant our layer runs; any other (aLoRA, Arrow, ...) stays PEFT's
            dora_only = all(type(v).__name__ == "DoraLinearVariant" for v in module.lora_variant.values())
            if base is not None and dora_only and (isinstance(module, PeftLinear)
                                                   or type(module).__name__ == "Linear4bit"):
                targets.append((name, module, base))
    for name, module, base in targets:
        new = QKLoraLinear.__new__(QKLoraLinear)
        new.__dict__.update(module.__dict__)  # adapters, dropout, scaling, merge state: shared, not copied
        new._modules["base_layer"] = base
        for a in list(new.lora_variant):
            new.lora_variant[a] = DoraVariant()
        parent_name, _, child = name.rpartition(".")
        setattr(peft_model.get_submodule(parent_name) if parent_name else peft_model, child, new)
    return peft_model
