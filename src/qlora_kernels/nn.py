"""Modules on the fused ops: a frozen 4-bit linear layer (bitsandbytes' state-dict keys),
a LoRA layer over a 4-bit or dense base, and transformers' LlamaRMSNorm on the fused
RMSNorm."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import formats, functional, ops
from .formats import QuantState
from .prepared import Prepared4bit, value_problem


class Linear4bit(nn.Module):
    """A frozen NF4/FP4 linear layer. ``weight`` holds the packed bytes (uint8
    ``[(out*in + 1) // 2, 1]``, a non-trainable Parameter as in bitsandbytes' Params4bit) and
    ``quant_state`` the decoding state; the state dict uses bitsandbytes' keys
    (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4``, ...)."""

    # the class's default: layers built without __init__ (transformers' and PEFT's shells) have it too
    compute = "fp32"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = formats.DEFAULT_BLOCKSIZE, double_quant: bool = False,
                 compute_dtype: Optional[torch.dtype] = None, device=None, dtype=None, compute: str = "fp32"):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.compute = functional.check_compute(compute)
        init = torch.empty(out_features, in_features, device=device)  # "meta": shapes only, as nn.Linear
        nn.init.kaiming_uniform_(init, a=math.sqrt(5))  # nn.Linear's initialisation
        packed, state = functional.quantize_4bit(init, quant_type, blocksize, double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self._prepared: Optional[Prepared4bit] = None
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype or torch.float32, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = formats.DEFAULT_BLOCKSIZE,
                    double_quant: bool = False, compute: str = "fp32") -> "Linear4bit":
        """Quantize an ``nn.Linear`` (its bias is kept as it is, trainable or not).
        ``compute="int8"`` selects the int8-compute forward (see functional.linear_4bit)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        expected = (linear.out_features, linear.in_features)
        if tuple(linear.weight.shape) != expected:
            # A ZeRO-3 partitioned weight (deepspeed.zero.Init) is an empty placeholder: quantized
            # as it is, it made a layer with no bytes that failed only at its first forward.
            why = (": it is a DeepSpeed ZeRO-3 partitioned parameter; build and quantize the model outside "
                   "deepspeed.zero.Init (deepspeed.initialize partitions the 4-bit bytes afterwards)"
                   ) if hasattr(linear.weight, "ds_id") else ""
            raise ValueError(f"from_linear: the weight has shape {tuple(linear.weight.shape)}, expected "
                             f"(out_features, in_features) = {expected}{why}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = None
        self.compute = functional.check_compute(compute)
        packed, state = functional.quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self._prepared = None
        self.bias = linear.bias
        return self

    @property
    def quant_type(self) -> str:
        return self.quant_state.quant_type

    @property
    def blocksize(self) -> int:
        return self.quant_state.blocksize

    def prepared(self) -> Prepared4bit:
        """The layer's weight, checked, with the values every call needs (fp32 absmax,
        kernels, int8 repack, DoRA row norms) made once. Prepared again when ``weight`` or
        ``quant_state`` is replaced or edited in place (prepared.Prepared4bit.current)."""
        p = self.__dict__.get("_prepared")
        if p is not None and p.made_from(self.weight, self.quant_state):
            return p.refreshed()  # the same objects, perhaps edited in place
        p = self._prepared = Prepared4bit(self.weight, self.quant_state)
        return p

    def __getstate__(self):
        # The prepared weight is derived (and holds kernel functions, which do not pickle):
        # copies and pickles prepare their own.
        state = self.__dict__.copy()
        state["_prepared"] = None
        return state

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return functional.dequantize_4bit(self.weight, self.quant_state, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = self.bias
        p = self.__dict__.get("_prepared")
        if p is None or not p.made_from(self.weight, self.quant_state):
            p = self.prepared()  # linear_4bit itself prepares again after an in-place edit
        y = functional.linear_4bit(x, p, None, bias, compute=getattr(self, "compute", "fp32"))
        return y.to(in_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.quant_state.nested}"
                + (f", compute={self.compute}" if getattr(self, "compute", "fp32") != "fp32" else ""))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        qs = {k[len(wkey) + 1:]: state_dict[k] for k in list(state_dict) if k.startswith(wkey + ".")}
        if qs:
            try:
                state = QuantState.from_dict(qs, validate=False)
            except ValueError as e:
                error_msgs.append(f"{wkey}: {e}")
                return
            if tuple(state.shape or ()) != (self.out_features, self.in_features):
                error_msgs.append(f"{wkey}: quantization state is for shape {tuple(state.shape or ())}, "
                                  f"this layer is [{self.out_features}, {self.in_features}]")
                return
            try:
                state.validate()
            except (ValueError, TypeError) as e:
                error_msgs.append(f"{wkey}: {e}")
                return
            bad = value_problem(state)  # as a checkpoint's are refused on from_pretrained (integrations.transformers)
            if bad is not None:
                error_msgs.append(f"{wkey}.{bad[0]}: {bad[1]}")
                return
            packed = state_dict.get(wkey)
            if packed is None or packed.numel() * packed.element_size() != formats.packed_numel(state.numel):
                error_msgs.append(f"{wkey}: packed weight does not match its quantization state")
                return
            for k in qs:
                state_dict.pop(wkey + "." + k)
            self.quant_state = state
            if packed.dtype != torch.uint8:
                packed = packed.contiguous().view(torch.uint8)
            state_dict[wkey] = packed.reshape(-1, 1)
            self.weight = nn.Parameter(torch.empty_like(state_dict[wkey]), requires_grad=False)
        elif wkey in state_dict:
            # packed bytes without their quantization state: decoded with this layer's own
            # state (its random initialisation's absmax) they would be another weight, and
            # strict loading reported every key matched
            error_msgs.append(f"{wkey}: packed bytes without their quantization state (expected "
                              f"{', '.join(wkey + '.' + k for k in self.quant_state.as_dict(packed=True))})")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class LoraLinear(nn.Module):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` on a :class:`Linear4bit` or dense
    ``nn.Linear`` base, through the fused ops. Initialised as PEFT does (A Kaiming-uniform,
    B zero); ``scaling`` is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""

    def __init__(self, base: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, (Linear4bit, nn.Linear)):
            raise TypeError(f"base must be qlora_kernels.nn.Linear4bit or torch.nn.Linear, got {type(base).__name__}")
        # bool is an int to Python; r=True would build a rank-1 adapter nobody asked for.
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if (isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float))
                or not 0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
        self.base_layer = base
        self.r = r
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = float(lora_dropout)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if isinstance(base, nn.Linear):
            base.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, Linear4bit):
            return functional.lora_linear_4bit(x, base.prepared(), None, self.lora_A, self.lora_B,
                                               self.scaling, base.bias, self.lora_dropout, self.training)
        return functional.lora_linear(x, base.weight, self.lora_A, self.lora_B, self.scaling, base.bias,
                                      self.lora_dropout, self.training)


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm (also Mistral's, Qwen2's, Phi-3's: ``weight * normed``, no
    +1 offset) on the fused op (``functional.rms_norm``) when x and weight are fp32 CPU
    tensors; otherwise (bf16, fp16, another device) LlamaRMSNorm's own math, roundings and
    all. ``weight`` and ``variance_epsilon`` keep LlamaRMSNorm's names, so an instance can
    replace one holding the same Parameter without changing the state dict."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight: nn.Parameter | None = None):
        super().__init__()
        self.weight = weight if weight is not None else nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype == torch.float32 and x.device.type == w.device.type == "cpu":
            # Inference: the op's implementation without the dispatcher, and without the checks
            # this line has just made (at decode's one row they cost more than the kernel).
            if (w.dim() == 1 and x.dim() >= 1 and x.shape[-1] == w.shape[0] > 0
                    and ops.linear.plain_call_ok(x, w)):
                return ops.norm_act.rms_norm_run(x, w, self.variance_epsilon)[0]
            return ops.norm_act.rms_norm_call(x, w, self.variance_epsilon)[0]
        input_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return w * h.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
