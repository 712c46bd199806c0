"""The public functions. They validate at the Python boundary (messages name the
argument), then call the torch.library ops, which run on the selected backend."""
from __future__ import annotations

import weakref

import torch

from . import _checks, _env, _ops_linear, formats
from . import _ops, _ops_loss  # noqa: F401  (declare the rest of torch.ops.qlora_kernels.*)
from . import backends as _backends
from .formats import QuantState


def quantize_4bit(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = formats.DEFAULT_BLOCKSIZE,
                  double_quant: bool = False) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``W`` (fp32/bf16/fp16, any shape, any strides) to NF4/FP4.

    Returns ``(packed, state)``: ``packed`` is uint8 ``[(n + 1) // 2, 1]`` and ``state`` a
    :class:`QuantState`; both are bit-identical to ``bitsandbytes.functional.quantize_4bit``
    with ``compress_statistics=double_quant``. NaN/Inf in ``W`` raise ``ValueError``.
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    _checks.quantize_4bit(W, blocksize, quant_type)
    packed, absmax = torch.ops.qlora_kernels.quantize_4bit(W.detach(), blocksize, quant_type)
    code = formats.codebook(quant_type)
    state = QuantState(absmax=absmax, shape=W.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=W.dtype)
    if double_quant:
        state.offset = absmax.mean()
        dmap = formats.dynamic_map().to(absmax.device)  # meta in, meta out
        qabsmax, absmax2 = torch.ops.qlora_kernels.quantize_blockwise_8bit(
            absmax - state.offset, dmap, formats.NESTED_BLOCKSIZE)
        state.absmax = qabsmax
        state.state2 = QuantState(absmax=absmax2, code=dmap.clone(), blocksize=formats.NESTED_BLOCKSIZE,
                                  dtype=torch.float32)
    return packed, state


# id(state) -> (weak reference to it, what was checked); QuantState is not hashable.
_CODE_CHECKED: dict = {}


def _check_state(state: QuantState) -> None:
    if not isinstance(state, QuantState):
        raise TypeError(
            f"state must be a qlora_kernels.QuantState, got {type(state).__name__}"
            " (convert a bitsandbytes state with QuantState.from_dict(bnb_state.as_dict()))"
        )
    state.validate()
    # A value check is data-dependent, so torch.compile graphs skip it (eager calls check).
    # It is remembered per (code tensor, its version): a layer's state is checked once,
    # not on every forward (the check cost ~10% of an M=1 4096x4096 call).
    if not torch.compiler.is_compiling():
        seen = (id(state.code), state.code._version, state.quant_type)
        entry = _CODE_CHECKED.get(id(state))
        if entry is None or entry[0]() is not state or entry[1] != seen:
            if not torch.equal(state.code.float().cpu(), formats._codebook_cpu(state.quant_type)):
                raise ValueError(f"state.code is not the {state.quant_type} codebook")
            key = id(state)
            _CODE_CHECKED[key] = (weakref.ref(state, lambda _, key=key: _CODE_CHECKED.pop(key, None)), seen)


def absmax_fp32(state: QuantState) -> torch.Tensor:
    """The per-block fp32 absmax; decodes double quantization the way bitsandbytes does
    (8-bit decode, then ``+ offset`` in fp32)."""
    _check_state(state)
    return _absmax_fp32(state)


def _absmax_fp32(state: QuantState) -> torch.Tensor:
    if not state.nested:
        return state.absmax
    s2 = state.state2
    absmax = torch.ops.qlora_kernels.dequantize_blockwise_8bit(state.absmax, s2.absmax, s2.code, s2.blocksize)
    return absmax + state.offset.float()


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode ``packed`` to ``state.shape`` in ``dtype`` (fp32/bf16/fp16; ``None`` takes the
    dtype the weight had). Bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    ``out``: a contiguous CPU tensor of ``state.shape`` to decode into (its dtype wins);
    reusing one avoids the page faults of a fresh multi-MB allocation on every call."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    _check_state(state)
    if packed.dtype != torch.uint8:
        if packed.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8) and packed.is_contiguous():
            packed = packed.view(torch.uint8)  # bitsandbytes' quant_storage: bytes kept in another dtype
        else:
            raise TypeError(f"packed must hold uint8 bytes, got {packed.dtype}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != tuple(state.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, state.shape is {tuple(state.shape)}")
        if out.dtype not in formats.INPUT_DTYPES:
            raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        torch.ops.qlora_kernels.dequantize_4bit_out(packed, absmax_fp32(state), state.blocksize, state.quant_type, out)
        return out
    dtype = state.dtype if dtype is None else dtype
    return torch.ops.qlora_kernels.dequantize_4bit(packed, absmax_fp32(state), state.blocksize, state.quant_type,
                                                   list(state.shape), dtype)


def _weight_args(packed: torch.Tensor, state: QuantState, in_features: int):
    _check_state(state)
    if len(state.shape) != 2:
        raise ValueError(f"state.shape must be [out_features, in_features] for a linear layer, got {tuple(state.shape)}")
    out_features, k = int(state.shape[0]), int(state.shape[1])
    if k != in_features:
        raise ValueError(f"x has {in_features} features but the 4-bit weight is [{out_features}, {k}]")
    if packed.dtype != torch.uint8:
        if packed.is_contiguous() and packed.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
            packed = packed.view(torch.uint8)
        else:
            raise TypeError(f"packed must hold uint8 bytes, got {packed.dtype}")
    return packed, _absmax_fp32(state), state.blocksize, state.quant_type, out_features


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (features last)")
    if x.device.type != "cpu":
        raise ValueError(f"x must be on the CPU for the cpu/reference backends, got device {x.device}")


# Inference fast path of linear_4bit. A weight is validated once per (state, packed) and
# remembered while none of the tensors involved changes (identity and version counter);
# an eager fp32 call that needs no autograd then goes straight to the cpu kernel. The
# checks, the backend lookup and the reshapes cost ~15 us a call, 8-10% of an M=1
# 4096 x 4096 product. id(state) -> (weak reference, signature, kernel arguments).
_PLAIN: dict = {}


def _plain_signature(packed: torch.Tensor, state: QuantState) -> tuple:
    a, c = state.absmax, state.code
    return (id(packed), packed._version, id(a), a._version, id(c), c._version, state.blocksize, state.quant_type,
            state.shape, state.state2)


_COMPUTE = {"fp32": ("linear_4bit", _ops_linear.linear_4bit_impl),
            "int8": ("linear_4bit_int8", _ops_linear.linear_4bit_int8_impl)}


def check_compute(compute: str) -> str:
    if compute not in _COMPUTE:
        raise ValueError(f"compute must be one of {tuple(_COMPUTE)}, got {compute!r}")
    return compute


def _remember_plain(packed: torch.Tensor, state: QuantState, args: tuple) -> None:
    p, absmax, blocksize, quant_type, out_features = args
    if state.nested or not (p.is_contiguous() and absmax.is_contiguous()):
        return
    kernels = {}
    for compute, (op, _) in _COMPUTE.items():
        backend, kernels[compute] = _backends.kernel_for(op, "cpu")
        if backend != "cpu":
            return
    key = id(state)
    old = _PLAIN.get(key)
    if old is not None and old[0]() is state and old[1] == _plain_signature(packed, state):
        return  # still valid: keep what it holds (a repacked copy is costly to remake)
    _PLAIN[key] = (weakref.ref(state, lambda _, key=key, d=_PLAIN: d.pop(key, None)), _plain_signature(packed, state),
                   (kernels, p, absmax, blocksize, quant_type, out_features, int(state.shape[1])), {})


# Whether one-row compute="int8" calls may keep a repacked copy of their weight (see
# int8_repack); QLORA_KERNELS_INT8_REPACK=0 starts with it off.
_INT8_REPACK = [_env.switch(_env.INT8_REPACK, True)]


def int8_repack(enabled: bool | None = None) -> bool:
    """Whether ``linear_4bit(..., compute="int8")`` on one row of x may run on a repacked
    copy of the weight (faster on AVX-512 VNNI CPUs, ~0.6x of the time of the bitsandbytes
    layout's kernel at 4096x4096; the copy is the size of ``packed`` and lives as long as
    the weight's QuantState). ``int8_repack(False)`` turns it off and frees the copies
    made so far; the environment variable ``QLORA_KERNELS_INT8_REPACK=0`` starts with it
    off. Returns the setting in force."""
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
        _INT8_REPACK[0] = enabled
        if not enabled:
            for entry in list(_PLAIN.values()):
                entry[3].pop("int8_one_row", None)
    return _INT8_REPACK[0]


def _int8_one_row(entry):
    """The repacked one-row int8 kernel of this weight (backends.cpu.int8_one_row), made on
    the first one-row int8 call and kept with the entry: it holds a second copy of the
    weight, which only inference at M=1 with compute="int8" asks for."""
    if not _INT8_REPACK[0]:
        return None
    extra = entry[3]
    if "int8_one_row" not in extra:
        from .backends import cpu

        _, p, absmax, blocksize, quant_type, out_features, k = entry[2]
        extra["int8_one_row"] = cpu.int8_one_row(p, absmax, blocksize, quant_type, out_features, k)
    return extra["int8_one_row"]


def _linear_4bit_plain(x, packed, state, bias, compute):
    """The fast path, or None when this call does not qualify."""
    entry = _PLAIN.get(id(state))
    grad = torch.is_grad_enabled()
    if (entry is None or type(x) is not torch.Tensor or x.dtype is not torch.float32
            or not x.is_cpu or (x.requires_grad and grad) or entry[0]() is not state
            or entry[1] != _plain_signature(packed, state) or _backends.get_backend() != "cpu"
            or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0
            or torch.compiler.is_compiling()):
        return None
    kernels, p, absmax, blocksize, quant_type, out_features, k = entry[2]
    if x.dim() < 1 or x.shape[-1] != k or not x.is_contiguous() or compute not in kernels:
        return None
    if bias is not None and (type(bias) is not torch.Tensor or bias.dtype is not torch.float32 or not bias.is_cpu
                             or bias.shape != (out_features,) or not bias.is_contiguous()
                             or (bias.requires_grad and grad)):
        return None
    if compute == "int8" and x.numel() == k:  # one row: the repacked kernel, where there is one
        one_row = _int8_one_row(entry)
        y = None if one_row is None else one_row(x, bias)
        if y is not None:
            return y
    return kernels[compute](x, p, absmax, blocksize, quant_type, out_features, bias)


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None, *,
                compute: str = "fp32") -> torch.Tensor:
    """``x @ dequantize_4bit(packed, state).T + bias`` without materializing the weight.
    Any leading dims; fp32/bf16/fp16 ``x`` (fp32 arithmetic, result in x's dtype).
    Differentiable in ``x`` and ``bias``; the 4-bit weight is frozen.

    ``compute="int8"`` (opt-in, for inference) quantizes each block of ``x`` to int8 and
    uses the codebook as int8 (ONNX Runtime's MatMulNBits accuracy_level=4, llama.cpp's
    8-bit activations): ~2x faster for few rows on AVX-512 VNNI CPUs, with ~1% relative
    error instead of fp32 rounding; its gradient is the fp32 one. For one row of x it
    keeps a repacked copy of the weight (see ``int8_repack``)."""
    y = _linear_4bit_plain(x, packed, state, bias, compute)
    if y is not None:
        return y
    op, impl = _COMPUTE[check_compute(compute)]
    _check_x(x)
    args = _weight_args(packed, state, x.shape[-1])
    if _ops_linear.plain_call_ok(x, bias, args[0], args[1]):  # inference: skip the dispatcher
        if _backends.get_backend() == "cpu":
            # Validated: remembered, and run as every later call will be (the one-row int8
            # kernel and the general one agree within their bound, not bit for bit).
            _remember_plain(packed, state, args)
            y = _linear_4bit_plain(x, packed, state, bias, compute)
            if y is not None:
                return y
        return impl(x, *args, bias)
    return getattr(torch.ops.qlora_kernels, op)(x, *args, bias)


def _dropout_noise(x: torch.Tensor, dropout_p: float, training: bool) -> torch.Tensor | None:
    """torch.nn.functional.dropout's mask, drawn the same way from torch's generator (a
    Bernoulli(1-p) tensor divided by 1-p), so a seeded run reproduces PEFT's dropout."""
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not training or dropout_p == 0.0:
        return None
    return torch.empty_like(x).bernoulli_(1 - dropout_p).div_(1 - dropout_p)


def lora_linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                     training: bool = False) -> torch.Tensor:
    """QLoRA: ``linear_4bit(x) + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``, with a fused
    backward giving dx, dA, dB (and the bias gradient when it trains)."""
    _check_x(x)
    args = _weight_args(packed, state, x.shape[-1])
    noise = _dropout_noise(x, dropout_p, training)
    return torch.ops.qlora_kernels.lora_linear_4bit(x, *args, lora_A, lora_B, _checks.scaling(scaling), bias, noise)[0]


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """LoRA on a dense base weight: ``x @ weight.T + bias + scaling * (dropout(x) @ A.T) @ B.T``."""
    _check_x(x)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    noise = _dropout_noise(x, dropout_p, training)
    return torch.ops.qlora_kernels.lora_linear(x, weight, lora_A, lora_B, _checks.scaling(scaling), bias, noise)[0]


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch=None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias).float(), labels, ignore_index=ignore_index,
    reduction=reduction)`` without materializing the [rows, vocab] logits: the output head
    and the loss fused, chunk by chunk, with the gradients computed in the forward pass
    (see _ops_loss). ``x`` is [..., hidden], ``labels`` has x's shape without its last
    dimension. ``num_items_in_batch`` divides the summed loss instead of the number of
    labelled rows (transformers' convention for gradient accumulation)."""
    _check_x(x)
    for name, t in (("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    grad = torch.is_grad_enabled()
    loss = torch.ops.qlora_kernels.linear_cross_entropy(
        x, weight, bias, labels, int(ignore_index), grad and x.requires_grad, grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad)[0]
    if num_items_in_batch is not None:
        return loss / num_items_in_batch
    if reduction == "sum":
        return loss
    return loss / (labels != ignore_index).sum()
