"""The public functions. They validate at the Python boundary (messages name the
argument), then call the torch.library ops, which run on the selected backend."""
from __future__ import annotations

import torch

from . import _env, formats, ops  # importing ops declares every torch.ops.qlora_kernels.*
from .ops import checks
from .formats import QuantState
from .prepared import Prepared4bit, check_state, decode_absmax, int8_repack, packed_bytes, prepare_4bit, resolve

try:
    from . import _C
except ImportError:  # no compiled extension: the reference backend, and torch's dropout masks
    _C = None

__all__ = ["Prepared4bit", "absmax_fp32", "check_compute", "dequantize_4bit", "int8_repack", "linear_4bit",
           "linear_cross_entropy", "lora_linear", "lora_linear_4bit", "prepare_4bit", "quantize_4bit", "rms_norm",
           "rope", "swiglu"]


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
    checks.quantize_4bit(W, blocksize, quant_type)
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


def absmax_fp32(state: QuantState) -> torch.Tensor:
    """The per-block fp32 absmax; decodes double quantization the way bitsandbytes does
    (8-bit decode, then ``+ offset`` in fp32)."""
    check_state(state)
    return decode_absmax(state)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode ``packed`` to ``state.shape`` in ``dtype`` (fp32/bf16/fp16; ``None`` takes the
    dtype the weight had). Bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    ``out``: a contiguous CPU tensor of ``state.shape`` to decode into (its dtype wins);
    reusing one avoids the page faults of a fresh multi-MB allocation on every call."""
    packed = packed_bytes(packed)
    check_state(state)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != tuple(state.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, state.shape is {tuple(state.shape)}")
        if out.dtype not in formats.INPUT_DTYPES:
            raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        torch.ops.qlora_kernels.dequantize_4bit_out(packed, decode_absmax(state), state.blocksize, state.quant_type, out)
        return out
    dtype = state.dtype if dtype is None else dtype
    if dtype not in formats.INPUT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}"
                        + (" (none given, and state.dtype is None)" if dtype is None else ""))
    return torch.ops.qlora_kernels.dequantize_4bit(packed, decode_absmax(state), state.blocksize, state.quant_type,
                                                   list(state.shape), dtype)


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (features last)")
    if x.device.type != "cpu":
        raise ValueError(f"x must be on the CPU for the cpu/reference backends, got device {x.device}")


_COMPUTE = {"fp32": (ops.linear.linear_4bit_call, ops.linear.linear_4bit_impl),
            "int8": (ops.linear.linear_4bit_int8_call, ops.linear.linear_4bit_int8_impl)}


def check_compute(compute: str) -> str:
    if compute not in _COMPUTE:
        raise ValueError(f"compute must be one of {tuple(_COMPUTE)}, got {compute!r}")
    return compute


def _weight(x: torch.Tensor, packed, state) -> Prepared4bit:
    w = resolve(packed, state)
    if w.in_features != x.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features but the 4-bit weight is [{w.out_features}, {w.in_features}]")
    return w


def linear_4bit(x: torch.Tensor, packed, state: QuantState | None = None, bias: torch.Tensor | None = None, *,
                compute: str = "fp32") -> torch.Tensor:
    """``x @ dequantize_4bit(packed, state).T + bias`` without materializing the weight.
    Any leading dims; fp32/bf16/fp16 ``x`` (fp32 arithmetic, result in x's dtype).
    Differentiable in ``x`` and ``bias``; the 4-bit weight is frozen.

    ``packed`` may be a prepared weight (``prepare_4bit(packed, state)``, with ``state``
    None): its checks and derived values are made once, which matters for few-row
    inference, where the per-call checks are a sizeable part of a one-row call.

    ``compute="int8"`` (opt-in, for inference) quantizes each block of ``x`` to int8 and
    uses the codebook as int8 (ONNX Runtime's MatMulNBits accuracy_level=4, llama.cpp's
    8-bit activations): faster for few rows (docs/benchmarks.md), with ~1% relative
    error instead of fp32 rounding; its gradient is the fp32 one. For one row of x a
    prepared weight keeps a repacked copy of itself (see ``int8_repack``)."""
    if type(packed) is Prepared4bit and state is None:  # first: this is the path whose cost matters
        y = packed.forward_direct(x, bias, compute)
        if y is not None:
            return y
    call, impl = _COMPUTE[check_compute(compute)]
    _check_x(x)
    w = _weight(x, packed, state)
    y = w.forward_direct(x, bias, compute)
    if y is not None:
        return y
    args = w.args()
    if ops.linear.plain_call_ok(x, bias, args[0], args[1]):  # inference: skip the dispatcher
        return impl(x, *args, bias)
    return call(x, *args, bias)


def _dropout_active(dropout_p: float, training: bool) -> bool:
    """Whether this call draws a dropout mask (dropout_p checked either way)."""
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return training and dropout_p != 0.0


def _dropout_noise(x: torch.Tensor, dropout_p: float, training: bool) -> torch.Tensor | None:
    """A dropout mask for x: Bernoulli(1-p) values divided by 1-p, as F.dropout multiplies.

    By default drawn by the extension (csrc/dropout.cpp: counter-based, from one seed taken
    from torch's generator, so torch.manual_seed reproduces a run; fp32 whatever x's dtype).
    On the AMD Zen 4 of docs/benchmarks.md torch's bernoulli_ took ~0.8 ms for 256 x 576
    values against ~0.1 ms here: 16% of a default finetune micro-batch.
    QLORA_KERNELS_DROPOUT=torch draws with torch's bernoulli_ instead: the very masks PEFT's
    nn.Dropout draws under the same seed. Traced code (torch.compile), other devices and a
    missing extension take torch's way."""
    if not _dropout_active(dropout_p, training):
        return None
    if x.device.type != "cpu" or _C is None or _env.dropout_rng() == "torch" or torch.compiler.is_compiling():
        return torch.empty_like(x).bernoulli_(1 - dropout_p).div_(1 - dropout_p)
    seed = int(torch.empty((), dtype=torch.int64, device="cpu").random_())
    # fp32 whatever x's dtype: the kernels widen it anyway, and 1/(1-p) stays exact to fp32
    noise = torch.empty(x.shape, dtype=torch.float32, device="cpu")
    _C.dropout_mask(noise.data_ptr(), noise.numel(), float(dropout_p), seed, torch.get_num_threads())
    return noise


def lora_linear_4bit(x: torch.Tensor, packed, state: QuantState | None, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                     training: bool = False) -> torch.Tensor:
    """QLoRA: ``linear_4bit(x) + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``, with a fused
    backward giving dx, dA, dB (and the bias gradient when it trains). ``packed`` may be a
    prepared weight (then ``state`` is None), as in ``linear_4bit``."""
    if type(packed) is Prepared4bit and state is None and not _dropout_active(dropout_p, training):
        # first: inference on a prepared weight (a decode step) is the path whose cost matters
        y = packed.lora_direct(x, lora_A, lora_B, scaling, bias)
        if y is not None:
            return y
    _check_x(x)
    w = _weight(x, packed, state)
    noise = _dropout_noise(x, dropout_p, training)
    if noise is None:
        y = w.lora_direct(x, lora_A, lora_B, scaling, bias)
        if y is not None:
            return y
    args = w.args()
    if noise is None and ops.linear.plain_call_ok(x, args[0], args[1], lora_A, lora_B, bias):
        # inference on another backend or layout: the dispatcher and the autograd wrapper
        # cost more than the kernel on a one-row SmolLM2 projection
        return ops.linear.lora_linear_4bit_impl(x, *args, lora_A, lora_B, checks.scaling(scaling), bias, None)[0]
    return ops.linear.lora_linear_4bit_call(x, *args, lora_A, lora_B, checks.scaling(scaling), bias, noise)[0]


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """LoRA on a dense base weight: ``x @ weight.T + bias + scaling * (dropout(x) @ A.T) @ B.T``."""
    _check_x(x)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    noise = _dropout_noise(x, dropout_p, training)
    return ops.linear.lora_linear_call(x, weight, lora_A, lora_B, checks.scaling(scaling), bias, noise)[0]


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch=None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias).float(), labels, ignore_index=ignore_index,
    reduction=reduction)`` without materializing the [rows, vocab] logits: the output head
    and the loss fused, chunk by chunk, with the gradients computed in the forward pass
    (see ops/loss.py). ``x`` is [..., hidden], ``labels`` has x's shape without its last
    dimension. ``num_items_in_batch`` divides the summed loss instead of the number of
    labelled rows (transformers' convention for gradient accumulation)."""
    _check_x(x)
    for name, t in (("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    grad = torch.is_grad_enabled()
    loss = ops.loss.linear_cross_entropy_call(
        x, weight, bias, labels, int(ignore_index), grad and x.requires_grad, grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad)[0]
    if num_items_in_batch is None and reduction == "sum":
        return loss
    n = (labels != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    n = torch.as_tensor(n, dtype=loss.dtype)
    # No labelled row (or num_items_in_batch 0): the loss is NaN as torch's, and the
    # gradients 0 as torch's. The gradients were made in the forward and are scaled by the
    # incoming one: 1/0 would make every one of them NaN (inf * 0).
    return torch.where(n != 0, loss / torch.where(n != 0, n, 1), torch.full_like(loss, float("nan")))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps))`` in one pass, transformers' LlamaRMSNorm
    math in fp32 arithmetic, rounded once to x's dtype (LlamaRMSNorm itself rounds the
    normed x to its dtype before the weight multiply and returns the weight's promotion;
    ``nn.RMSNorm`` keeps that behaviour for other dtypes); the backward is one pass too
    (ops/norm_act.py)."""
    checks.rms_norm(x, weight, eps)
    return ops.norm_act.rms_norm_call(x, weight, float(eps))[0]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in one pass (fp32 arithmetic, gate's dtype); its backward
    recomputes the sigmoid from gate instead of keeping silu(gate)."""
    checks.swiglu(gate, up)
    return ops.norm_act.swiglu_call(gate, up)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)``
    for q [B, H, S, D] and k, v [B, Hk, S, D] (H a multiple of Hk), with its backward, on the
    fused kernels (ops/attention.py); ``scale`` defaults to D ** -0.5. ``key_lengths`` (integer
    [B], values in [1, S]) masks right padding: batch row b's queries see only its first
    key_lengths[b] keys, as sdpa with transformers' padding mask (causal and key < length).
    Returns [B, H, S, D] (a view of a [B, S, H, D] buffer: ``.transpose(1, 2)`` of it is
    contiguous)."""
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0  # an empty head size fails the checks
    checks.attention(q, k, v, scale, key_lengths)
    return ops.attention.causal_attention_call(q, k, v, float(scale), key_lengths)[0].transpose(1, 2)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``: ``x * cos +
    rotate_half(x) * sin`` for q and k, with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``,
    in one pass each way (ops/rope.py; fp32 arithmetic, each product rounded as torch rounds
    it). q [B, H, S, D] and k [B, Hk, S, D] with cos, sin [B or 1, S, D] (unsqueeze_dim=1), or
    q [B, S, H, D], k [B, S, Hk, D] (unsqueeze_dim=2). Differentiable in q and k; cos and sin
    get no gradient (transformers makes them without one), so they must not require one.
    The results keep q's and k's dtypes (transformers would promote 16-bit q with fp32 cos to
    fp32)."""
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ([B, H, S, D] inputs) or 2 ([B, S, H, D]), got {unsqueeze_dim!r}")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D torch.Tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    checks.rope(q, k, cos, sin)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("cos and sin require a gradient, which rope does not compute: detach them")
    qo, ko = ops.rope.rope_call(q, k, cos, sin)
    # the op's [B, S, heads, D] buffers: as [B, heads, S, D] views, or as they are
    return (qo, ko) if unsqueeze_dim == 2 else (qo.transpose(1, 2), ko.transpose(1, 2))

