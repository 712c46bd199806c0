"""transformers integration: ``QLoraKernelsConfig`` and its ``HfQuantizer``, registered as
quantization method ``"qlora_kernels"``, so ``from_pretrained`` builds qlora_kernels'
``Linear4bit`` layers; and bitsandbytes' 4-bit checkpoints loaded without bitsandbytes.

    import qlora_kernels.integrations.transformers as qkt        # registers "qlora_kernels"
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qkt.QLoraKernelsConfig())
    model = AutoModelForCausalLM.from_pretrained(bnb_path, config=qkt.config_from_bitsandbytes(bnb_path))

Checkpoints use bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``,
``weight.quant_state.bitsandbytes__nf4``). Needs the transformers 5.x loader (``core_model_loading``;
tested: 5.0.0, 5.12.0, 5.24.0); 4.x loaded through ``create_quantized_param`` and is not supported.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

try:
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
    from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as e:  # pragma: no cover - exercised only with transformers 4.x or without it
    raise ImportError("qlora_kernels.integrations.transformers needs transformers>=5 (pip install "
                      "'qlora-kernels[hf]'); 4.x's quantizer API is not supported") from e

from .. import formats, functional
from ..formats import QuantState
from ..nn import Linear4bit
from ..prepared import value_problem

QUANT_METHOD = "qlora_kernels"
_PACKED_STATE = "quant_state.bitsandbytes__"
# Everything a 4-bit weight is saved as, relative to the module (bitsandbytes' names).
_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                   _PACKED_STATE + "nf4", _PACKED_STATE + "fp4")


def _as_dtype(value, what: str) -> Optional[torch.dtype]:
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{what} must be a torch.dtype or its name, got {value!r}")
    if dtype is not None and dtype not in formats.INPUT_DTYPES:
        raise ValueError(f"{what} must be one of {formats.INPUT_DTYPES} or None, got {dtype}")
    return dtype


class QLoraKernelsConfig(QuantizationConfigMixin):
    """Quantize ``nn.Linear`` layers to qlora_kernels' NF4/FP4 ``Linear4bit`` on load.

    ``skip_modules``: module names (or suffixes / regexes, matched as transformers matches
    bitsandbytes' ``llm_int8_skip_modules``) kept in full precision; ``None`` takes
    transformers' default (output embeddings, tied and last modules). ``compute_dtype``:
    the dtype activations are cast to inside the 4-bit layers (``None``: the input's).
    ``fuse_loss``: compute the training loss with the fused output head + cross-entropy
    (integrations.hf_loss: no [tokens, vocab] logits; ``logits=None`` in training-mode
    outputs that carry a loss)."""

    def __init__(self, quant_type: str = "nf4", blocksize: int = formats.DEFAULT_BLOCKSIZE, double_quant: bool = True,
                 compute_dtype=torch.float32, skip_modules: Optional[Iterable[str]] = ("lm_head",),
                 fuse_loss: bool = False, **kwargs):
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {method!r}")
        if kwargs:  # an unknown key may be a format option this version does not understand
            raise ValueError(f"QLoraKernelsConfig: unknown options {sorted(kwargs)}")
        self.quant_method, self.quant_type, self.blocksize = QUANT_METHOD, quant_type, blocksize
        self.double_quant, self.fuse_loss = double_quant, fuse_loss
        self.compute_dtype = _as_dtype(compute_dtype, "compute_dtype")
        self.skip_modules = [skip_modules] if isinstance(skip_modules, str) else (
            None if skip_modules is None else list(skip_modules))
        self.post_init()

    def post_init(self) -> None:
        if self.quant_type not in formats.QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {formats.QUANT_TYPES}, got {self.quant_type!r}")
        if isinstance(self.blocksize, bool) or self.blocksize not in formats.BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {formats.BLOCKSIZES}, got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {type(self.double_quant).__name__}")
        if not isinstance(self.fuse_loss, bool):
            raise TypeError(f"fuse_loss must be a bool, got {type(self.fuse_loss).__name__}")
        if self.skip_modules is not None and not all(isinstance(s, str) for s in self.skip_modules):
            raise TypeError(f"skip_modules must be a list of module names, got {self.skip_modules!r}")

    def to_dict(self) -> dict[str, Any]:
        # config.json needs plain JSON: the dtype goes by name, as BitsAndBytesConfig writes it.
        return {"quant_method": QUANT_METHOD, "quant_type": self.quant_type, "blocksize": self.blocksize,
                "double_quant": self.double_quant, "fuse_loss": self.fuse_loss,
                "compute_dtype": None if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch."),
                "skip_modules": None if self.skip_modules is None else list(self.skip_modules)}

    @classmethod
    def from_bitsandbytes(cls, bnb_config) -> "QLoraKernelsConfig":
        """The equivalent of a 4-bit ``BitsAndBytesConfig`` (object or its dict)."""
        d = bnb_config if isinstance(bnb_config, dict) else bnb_config.to_dict()
        if d.get("load_in_8bit") or not d.get("load_in_4bit"):
            raise ValueError("only 4-bit bitsandbytes configs (load_in_4bit=True) have a qlora_kernels equivalent")
        return cls(quant_type=d.get("bnb_4bit_quant_type", "fp4"),
                   double_quant=bool(d.get("bnb_4bit_use_double_quant")),
                   compute_dtype=d.get("bnb_4bit_compute_dtype") or torch.float32,
                   skip_modules=d.get("llm_int8_skip_modules"))


def config_from_bitsandbytes(pretrained_model_name_or_path, **kwargs):
    """The model config of a bitsandbytes 4-bit checkpoint with its quantization_config
    replaced by the equivalent QLoraKernelsConfig: pass it as ``from_pretrained(path,
    config=...)`` to load the checkpoint into qlora_kernels' layers (bitsandbytes is not
    imported). ``kwargs`` go to ``AutoConfig.from_pretrained``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise ValueError(f"{pretrained_model_name_or_path}: config.json has no quantization_config")
    # A dict, not the object: transformers' loader reads a checkpoint's config with .get().
    config.quantization_config = QLoraKernelsConfig.from_bitsandbytes(qc).to_dict()
    return config


class HfLinear4bit(Linear4bit):
    """Linear4bit as transformers builds it: a meta-device weight and no ``quant_state`` until
    the loader quantizes or restores it (the quantizer rejects a model left so); its state
    dict, which transformers takes before loading, has no quant_state keys meanwhile. The
    placeholder weight has the checkpoint tensor's dtype (older 5.x loaders, e.g. 5.12, cast
    to it): packed bytes for a 4-bit checkpoint, the linear's float weight otherwise."""

    @classmethod
    def shell(cls, linear: nn.Module, config: QLoraKernelsConfig, pre_quantized: bool) -> "HfLinear4bit":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        out_f, in_f = linear.weight.shape
        if type(linear) is not nn.Linear:  # GPT-2's Conv1D stores the weight as [in, out]
            in_f, out_f = out_f, in_f
        self.in_features, self.out_features = in_f, out_f
        self.compute_dtype = config.compute_dtype
        self.weight = nn.Parameter(torch.empty(formats.packed_numel(in_f * out_f), 1, dtype=torch.uint8, device="meta")
                                   if pre_quantized else linear.weight.detach().to("meta"), requires_grad=False)
        self.quant_state, self._prepared = None, None
        self.bias = linear.bias
        self.source_cls = type(linear)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        save = nn.Module._save_to_state_dict if self.quant_state is None else Linear4bit._save_to_state_dict
        save(self, destination, prefix, keep_vars)

    def extra_repr(self) -> str:  # Linear4bit's reads quant_state
        return super().extra_repr() if self.quant_state is not None else "not loaded"


def _err(key: str, msg: str) -> ValueError:
    return ValueError(f"{key}: {msg}")


def restore_state(weight_key: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]
                  ) -> tuple[torch.Tensor, QuantState]:
    """Check a layer's saved 4-bit weight against its quantization state and the layer's
    ``shape`` ([out, in]); return ``(packed uint8 [(n+1)//2, 1], QuantState)``. ``tensors``
    maps bitsandbytes' names relative to the module (``"weight"``, ``"weight.absmax"``, ...)
    to tensors; ``weight`` may be a meta tensor (its size is checked). Errors: ValueError
    naming the offending checkpoint key."""
    packed = tensors.get("weight")
    if packed is None:
        raise _err(weight_key, "missing: the checkpoint has this layer's quantization state but not its packed weight")
    packed_keys = [k for k in tensors if k.startswith("weight." + _PACKED_STATE)]
    if len(packed_keys) != 1:
        raise _err(f"{weight_key}.{_PACKED_STATE}nf4", f"expected one packed quant_state tensor, found "
                   f"{[weight_key + k[6:] for k in packed_keys]}")
    qs_key = weight_key + packed_keys[0][6:]
    stats = {k[7:]: v for k, v in tensors.items() if k.startswith("weight.")}
    try:
        state = QuantState.from_dict(stats, validate=False)  # validated below, naming the key
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _err(qs_key, f"unreadable quantization state ({e})") from None
    if state.quant_type != packed_keys[0].rsplit("__", 1)[1]:
        raise _err(qs_key, f"the key says {packed_keys[0].rsplit('__', 1)[1]} but the state says {state.quant_type}")
    if state.blocksize not in formats.BLOCKSIZES:
        raise _err(qs_key, f"blocksize {state.blocksize} is not one of {formats.BLOCKSIZES}")
    if state.shape is None or tuple(state.shape) != tuple(shape):
        raise _err(qs_key, f"quantization state is for shape {None if state.shape is None else tuple(state.shape)}, "
                   f"this layer's weight is {list(shape)}")
    n = state.numel
    if packed.numel() * packed.element_size() != formats.packed_numel(n):
        raise _err(weight_key, f"packed weight has {packed.numel() * packed.element_size()} bytes ({packed.dtype} "
                   f"{list(packed.shape)}), a {list(shape)} 4-bit weight needs {formats.packed_numel(n)}")
    nblocks = formats.num_blocks(n, state.blocksize)
    want = torch.uint8 if state.nested else torch.float32
    if state.absmax.numel() != nblocks or state.absmax.dtype != want:
        raise _err(weight_key + ".absmax", f"expected {nblocks} {want} values (one per {state.blocksize}-element "
                   f"block), got {state.absmax.numel()} {state.absmax.dtype}")
    if state.nested:
        s2 = state.state2
        if s2.blocksize < 1 or s2.absmax.numel() != formats.num_blocks(nblocks, s2.blocksize) \
                or s2.absmax.dtype != torch.float32:
            raise _err(weight_key + ".nested_absmax", f"expected {formats.num_blocks(nblocks, max(s2.blocksize, 1))} "
                       f"float32 values for {nblocks} absmax codes, got {s2.absmax.numel()} {s2.absmax.dtype}")
        if s2.code.numel() != 256 or s2.code.dtype != torch.float32:
            raise _err(weight_key + ".nested_quant_map", f"expected 256 float32 values, got {s2.code.numel()}")
    bad = value_problem(state)  # the codebook and finite scales, as Linear4bit.load_state_dict checks them
    if bad is not None:
        raise _err(f"{weight_key}.{bad[0]}", bad[1])
    try:
        state.validate()  # whatever the checks above do not name
    except (ValueError, TypeError) as e:
        raise _err(qs_key, str(e)) from None
    if packed.device.type != "meta":
        packed = packed.contiguous()
        packed = (packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)).reshape(-1, 1)
    return packed, state


class _Op(ConversionOps):
    def __init__(self, hf_quantizer: "QLoraKernelsHfQuantizer"):
        # The attribute also tells transformers (get_new_dtype) not to cast what the op loads.
        self.hf_quantizer = hf_quantizer


class _QuantizeOnLoad(_Op):
    """Quantizes a full-precision checkpoint weight with our kernels as it is loaded."""

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        cfg = self.hf_quantizer.quantization_config
        out = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, key)
            if module.source_cls is not nn.Linear:  # Conv1D: [in, out] on disk
                value = value.T
            if tuple(value.shape) != (module.out_features, module.in_features):
                raise _err(key, f"checkpoint weight is {list(value.shape)}, the layer is "
                           f"[{module.out_features}, {module.in_features}]")
            packed, state = functional.quantize_4bit(value, cfg.quant_type, cfg.blocksize, cfg.double_quant)
            module.quant_state = state
            module._is_hf_initialized = True
            out[key] = nn.Parameter(packed, requires_grad=False)
        return out


class _Deserialize(_Op):
    """Restores a 4-bit layer from its saved bytes and state. transformers routes every
    ``*.weight`` key through it (the converter's source pattern is ``weight``), so a weight
    of an unquantized module passes through, cast to its parameter's dtype."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        tensors = {k: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
        module, name = get_module_from_name(model, full_layer_name)
        extra = sorted(k for k in tensors if k != "weight")
        if not isinstance(module, Linear4bit):
            if extra:
                raise _err(full_layer_name, f"the checkpoint stores it in 4-bit ({extra}) but this model keeps "
                           f"{type(module).__name__} unquantized (skip_modules?)")
            ref, value = getattr(module, name, None), tensors["weight"]
            if isinstance(ref, torch.Tensor) and ref.is_floating_point() and value.is_floating_point():
                tensors["weight"] = value.to(ref.dtype)
            return tensors
        if not extra:
            raise _err(full_layer_name, "the checkpoint stores this layer without its 4-bit quantization state "
                       f"(weight.absmax, weight.quant_map, weight.{_PACKED_STATE}nf4|fp4); list it in skip_modules "
                       "to load it in full precision")
        packed, state = restore_state(full_layer_name, tensors, (module.out_features, module.in_features))
        module.quant_state = state
        module._is_hf_initialized = True
        return {"weight": nn.Parameter(packed, requires_grad=False)}


def _validate_checkpoint_files(model: nn.Module, files: Iterable[str]) -> None:
    """Check every 4-bit layer of a safetensors checkpoint before anything loads, so a bad
    key stops from_pretrained with a ValueError naming it (transformers' loader gathers
    errors of conversion ops into one generic RuntimeError, after loading everything else)."""
    from safetensors import safe_open

    where = {}
    for f in (f for f in files if str(f).endswith(".safetensors")):
        with safe_open(f, "pt") as h:
            where.update(dict.fromkeys(h.keys(), f))
    layers = {k[: -len(".weight." + s)] for k in where for s in _STATE_SUFFIXES if k.endswith(".weight." + s)}
    prefix = (getattr(model, "base_model_prefix", "") or "") + "."
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    for name in quantized:  # a layer we quantize, saved in full precision
        for key in {name, name.removeprefix(prefix)}:
            if key + ".weight" in where and key not in layers:
                raise _err(key + ".weight", "the checkpoint stores this layer without its 4-bit quantization state; "
                           "list it in skip_modules to load it in full precision")
    modules = dict(model.named_modules())
    for layer in sorted(layers):
        module = next((modules[n] for n in (layer, prefix + layer, layer.removeprefix(prefix)) if n in modules), None)
        if module is None:
            continue  # not this model's layer: transformers reports its keys as unexpected
        if not isinstance(module, Linear4bit):
            raise _err(layer + ".weight", f"the checkpoint stores it in 4-bit but this model keeps "
                       f"{type(module).__name__} unquantized (skip_modules?)")
        tensors = {}
        for suffix in ["weight"] + ["weight." + s for s in _STATE_SUFFIXES]:
            key = f"{layer}.{suffix}"
            if key in where:
                with safe_open(where[key], "pt") as h:
                    if suffix == "weight":  # its size is all we check: the packed bytes are the bulk of the file
                        sl = h.get_slice(key)
                        if sl.get_dtype() not in _SAFETENSORS_DTYPES:
                            raise _err(key, f"packed weight stored as {sl.get_dtype()}, not bytes")
                        tensors[suffix] = torch.empty(sl.get_shape(), dtype=_SAFETENSORS_DTYPES[sl.get_dtype()],
                                                      device="meta")
                    else:
                        tensors[suffix] = h.get_tensor(key)
        restore_state(layer + ".weight", tensors, (module.out_features, module.in_features))
        if "weight" in tensors:  # the placeholder takes the stored dtype (quant_storage), see HfLinear4bit
            module.weight = nn.Parameter(tensors["weight"], requires_grad=False)


# Storage dtypes bitsandbytes allows for packed bytes (quant_storage).
_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F32": torch.float32}


class QLoraKernelsHfQuantizer(HfQuantizer):
    """Replaces ``nn.Linear`` (and GPT-2's ``Conv1D``) by :class:`HfLinear4bit` before the
    weights load; quantizes full-precision weights with our kernels, or restores saved 4-bit
    ones. CPU only (the kernels' backends are the CPU ones)."""

    requires_calibration = False
    quantization_config: QLoraKernelsConfig
    serialized_names = {"weight": ["weight." + s for s in _STATE_SUFFIXES] + ["weight"]}

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args, device_map=None, **kwargs):
        places = device_map.values() if isinstance(device_map, dict) else [device_map]
        bad = sorted({str(p) for p in places if p is not None and str(p) not in ("cpu", "auto")})
        if bad:
            raise ValueError(f"device_map: qlora_kernels' 4-bit layers run on the CPU, got {bad}")

    def update_device_map(self, device_map):
        return {"": "cpu"} if device_map is None or device_map == "auto" else device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, Linear4bit) and name == "weight"

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.skip_modules, list(getattr(model, "_keep_in_fp32_modules", None) or []))
        for name, module in list(model.named_modules()):
            if name and should_convert_module(name, self.modules_to_not_convert) and (
                    type(module) is nn.Linear or type(module).__name__ == "Conv1D"):
                model.set_submodule(name, HfLinear4bit.shell(module, cfg, self.pre_quantized))
        if self.pre_quantized and checkpoint_files:
            # from_pretrained runs this under a meta-device context; the checks need real tensors
            # (and formats' cached codebooks must never be created on the meta device).
            with torch.device("cpu"):
                _validate_checkpoint_files(model, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        empty = [n for n, m in model.named_modules() if isinstance(m, Linear4bit) and m.quant_state is None]
        if empty:  # missing from the checkpoint: the layer would hold uninitialised bytes
            raise ValueError(f"no weight in the checkpoint for the 4-bit layers {[n + '.weight' for n in empty]}; "
                             "add them to skip_modules to keep them in full precision")
        # transformers 5.25 keeps the load converters on the model and reverses them in
        # save_pretrained; ours has no reverse (NotImplementedError: a model loaded from a 4-bit
        # checkpoint could not be saved again), and needs none: Linear4bit's state_dict is the
        # serialized form already.
        convs = getattr(model, "_weight_conversions", None)
        if isinstance(convs, list):
            model._weight_conversions = [c for c in convs if not any(
                isinstance(op, _Deserialize) for op in (getattr(c, "operations", None) or []))]
        if self.quantization_config.fuse_loss:
            from .hf_loss import fuse_loss

            fuse_loss(model)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # The Trainer refuses a quantized model that is not a PeftModel unless this is True;
        # qlora_kernels.nn.LoraLinear adapters attached by hand are such a model. The 4-bit
        # weights are uint8 Parameters with requires_grad=False: no optimizer updates them.
        return True

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": _Deserialize}

    def get_weight_conversions(self):
        # transformers 5.24's base class builds this from serialized_names and
        # get_load_operations; 5.0 and 5.12 only call this method.
        from transformers.core_model_loading import WeightConverter

        names = self.serialized_names["weight"]
        return ([WeightConverter(source_patterns=names, target_patterns="weight", operations=[_Deserialize(self)])]
                if self.pre_quantized else [])

    def _dequantize(self, model, dtype=None):
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight, lin.bias = nn.Parameter(m.dequantize(_as_dtype(dtype, "dtype") or torch.float32)), m.bias
            model.set_submodule(name, lin)
        return model


# A re-import (importlib.reload) replaces our own entries; another library's "qlora_kernels"
# entry stays an error, as transformers' register functions make it.
for _mapping, _register, _cls in ((AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, QLoraKernelsConfig),
                                  (AUTO_QUANTIZER_MAPPING, register_quantizer, QLoraKernelsHfQuantizer)):
    if getattr(_mapping.get(QUANT_METHOD), "__module__", None) == __name__:
        del _mapping[QUANT_METHOD]
    _register(QUANT_METHOD)(_cls)

__all__ = ["QUANT_METHOD", "HfLinear4bit", "QLoraKernelsConfig", "QLoraKernelsHfQuantizer", "config_from_bitsandbytes",
           "restore_state"]
