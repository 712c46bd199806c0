"""The argument checks of every op, written once. Each op's real and fake implementations
call the same check before anything else, so a bad argument fails the same way in eager
mode, under torch.compile and on every backend, and no native kernel ever sees a size it
was not told about (the C++ bindings check the sizes again: QK_REQUIRE).

Every tensor argument is checked for type, dtype, device, size and (where a kernel takes
a raw pointer) layout. All tensors of one call must share one device: a meta tensor among
CPU ones would send the call to the fake implementation, which returns uninitialized CPU
memory. Messages name the argument and are built only when a check fails."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import formats

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_DEVICES = ("cpu", "meta")


def _dtype_names(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def tensor(name: str, t, dtypes: Sequence[torch.dtype] | None = None, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be {_dtype_names(dtypes)}, got {t.dtype}")
    if t.device.type not in _DEVICES:
        raise ValueError(f"{name} must be on the CPU, got device {t.device}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def same_device(**named: Optional[torch.Tensor]) -> None:
    """All given tensors (None skipped) on the device of the first one."""
    first = None
    for name, t in named.items():
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{name} is on {t.device} but {first[0]} is on {first[1]}: every tensor argument of "
                             f"one call must be on the same device")


def blocksize(value, name: str = "blocksize") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value not in formats.BLOCKSIZES:
        raise ValueError(f"{name} must be one of {formats.BLOCKSIZES}, got {value!r}")


def quant_type(value, name: str = "quant_type") -> None:
    if value not in formats.QUANT_TYPES:
        raise ValueError(f"{name} must be one of {formats.QUANT_TYPES}, got {value!r}")


def bias(b: Optional[torch.Tensor], out_features: int) -> None:
    if b is None:
        return
    tensor("bias", b, FLOATS)
    if tuple(b.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(b.shape)}, expected ({out_features},)")


def scaling(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scaling must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"scaling must be finite, got {value}")
    return float(value)


def numel(shape: Sequence[int], name: str = "state.shape") -> int:
    n = 1
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"{name} must hold non-negative ints, got {tuple(shape)}")
        n *= s
    return n


def weight_bytes(packed: torch.Tensor, absmax: torch.Tensor, n: int, block: int, what: str, whose: str) -> None:
    """packed and absmax hold exactly what n 4-bit values in blocks of `block` need."""
    if packed.numel() != formats.packed_numel(n):
        raise ValueError(f"packed has {packed.numel()} bytes but {what} needs {formats.packed_numel(n)}: {whose}")
    if absmax.numel() != formats.num_blocks(n, block):
        raise ValueError(f"state.absmax has {absmax.numel()} entries but {what} with blocksize {block} needs "
                         f"{formats.num_blocks(n, block)}")


# ------------------------------------------------------------------ quantization ----

def quantize_4bit(A: torch.Tensor, block: int, qtype: str) -> None:
    tensor("W", A, formats.INPUT_DTYPES)
    blocksize(block)
    quant_type(qtype)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, block: int, qtype: str, shape: Sequence[int],
                    dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> None:
    tensor("packed", packed, (torch.uint8,))
    tensor("state.absmax", absmax, (torch.float32,))
    if out is not None:
        tensor("out", out)
    same_device(packed=packed, **{"state.absmax": absmax}, out=out)
    blocksize(block, "state.blocksize")
    quant_type(qtype, "state.quant_type")
    if dtype not in formats.INPUT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    n = numel([int(s) for s in shape])
    weight_bytes(packed, absmax, n, block, f"state.shape {tuple(shape)}",
                 "the packed tensor does not belong to this state")


def blockwise_8bit(A: torch.Tensor, code: torch.Tensor, block: int, a_name: str = "A",
                   a_dtype: torch.dtype = torch.float32) -> None:
    tensor(a_name, A, (a_dtype,))
    tensor("code", code, (torch.float32,))
    same_device(**{a_name: A}, code=code)
    if code.numel() != 256:
        raise ValueError(f"code must be the 256-entry 8-bit map, got {code.numel()} entries")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"blocksize must be a positive int, got {block!r}")


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> None:
    blockwise_8bit(q, code, block, "state.absmax (8-bit codes)", torch.uint8)
    tensor("state.state2.absmax", absmax, (torch.float32,))
    same_device(q=q, **{"state.state2.absmax": absmax})
    if absmax.numel() != formats.num_blocks(q.numel(), block):
        raise ValueError(f"state.state2.absmax has {absmax.numel()} entries; {q.numel()} codes with blocksize "
                         f"{block} need {formats.num_blocks(q.numel(), block)}")


# ------------------------------------------------------------------------ linear ----

def weight(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, block: int, qtype: str,
           out_features: Optional[int], in_features: Optional[int], b: Optional[torch.Tensor] = None,
           x_name: str = "x") -> None:
    """``x`` against the weight [out_features, in_features]; a size given as None is x's
    last dimension, read only after x is known to have one."""
    rows(x_name, x)
    out_features = x.shape[-1] if out_features is None else out_features
    in_features = x.shape[-1] if in_features is None else in_features
    tensor("packed", packed, (torch.uint8,))
    tensor("state.absmax", absmax, (torch.float32,))
    bias(b, out_features)
    same_device(**{x_name: x}, packed=packed, **{"state.absmax": absmax}, bias=b)
    blocksize(block, "state.blocksize")
    quant_type(qtype, "state.quant_type")
    if out_features < 0 or in_features < 0:
        raise ValueError(f"the weight's shape must be non-negative, got [{out_features}, {in_features}]")
    weight_bytes(packed, absmax, out_features * in_features, block, f"a [{out_features}, {in_features}] weight",
                 "the state does not belong to this weight")


def rows(name: str, t) -> None:
    """A floating tensor with its features last: checked before anything reads shape[-1]
    (a 0-d one raised a bare IndexError)."""
    tensor(name, t, FLOATS)
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (features last), got a 0-d tensor")


def lora_dy(dy: torch.Tensor, x: torch.Tensor) -> None:
    """The backward's incoming gradient: one row per row of x. Unchecked, a dy on another
    device sent the call to the fake kernel, which returned uninitialized memory."""
    rows("dy", dy)
    same_device(x=x, dy=dy)
    if tuple(dy.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(f"dy has shape {tuple(dy.shape)}; x has {tuple(x.shape)}, so dy must be "
                         f"[{', '.join(map(str, x.shape[:-1]))}, out_features]")


def lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, out_features: int,
         b: Optional[torch.Tensor], noise: Optional[torch.Tensor], scale=None) -> None:
    """``scale``: the adapter's scaling, checked too when given (the ops are callable
    directly, past functional's check)."""
    if scale is not None:
        scaling(scale)
    K = x.shape[-1]
    tensor("lora_A", lora_A, FLOATS, dim=2)
    tensor("lora_B", lora_B, FLOATS, dim=2)
    if noise is not None:
        tensor("dropout noise", noise, FLOATS)
    bias(b, out_features)
    same_device(x=x, lora_A=lora_A, lora_B=lora_B, bias=b, noise=noise)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError("lora_A has rank 0: a LoRA adapter needs r >= 1")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}; x has {K} features, so it must be [r, {K}]")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}; it must be [{out_features}, {r}] "
                         f"(out_features, rank of lora_A)")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"dropout noise has shape {tuple(noise.shape)}, x has {tuple(x.shape)}")


def lora_u(u: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor) -> None:
    """The forward's x @ lora_A.T that the backward reuses: fp32 [rows of x, r]."""
    tensor("u", u, (torch.float32,), dim=2)
    same_device(x=x, u=u)
    rows = math.prod(x.shape[:-1])
    if tuple(u.shape) != (rows, lora_A.shape[0]):
        raise ValueError(f"u has shape {tuple(u.shape)}; x has {rows} rows and lora_A rank {lora_A.shape[0]}, so it "
                         f"must be [{rows}, {lora_A.shape[0]}] (the forward's second output)")


def last_dim(x: torch.Tensor, w: torch.Tensor, n: int) -> None:
    """x's last dimension must be n, which weight's shape sets."""
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(f"weight has shape {tuple(w.shape)}; x has shape {tuple(x.shape)}, so x's last dimension "
                         f"must be {n}")


def dense(x: torch.Tensor, w: torch.Tensor) -> None:
    tensor("x", x, FLOATS)
    tensor("weight", w, FLOATS, dim=2)
    same_device(x=x, weight=w)
    last_dim(x, w, w.shape[1])


# -------------------------------------------------------------------------- loss ----

def loss(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], labels: torch.Tensor) -> None:
    dense(x, w)
    tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 (or int32) tensor of class indices, got {labels.dtype}")
    bias(b, w.shape[0])
    same_device(x=x, weight=w, bias=b, labels=labels)
    if w.shape[0] < 1:
        raise ValueError(f"weight has shape {tuple(w.shape)}: the vocabulary (its first dimension) must be >= 1")
    if w.shape[1] < 1:
        raise ValueError(f"weight has shape {tuple(w.shape)}: the hidden size (its second dimension) must be >= 1")
    if tuple(labels.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(x.shape[:-1])} (x without its "
                         f"last dimension)")


# ---------------------------------------------------------- RMSNorm / SwiGLU ----

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps) -> None:
    tensor("x", x, FLOATS)
    tensor("weight", w, FLOATS, dim=1)
    same_device(x=x, weight=w)
    last_dim(x, w, w.shape[0])
    if w.shape[0] < 1:
        raise ValueError("weight is empty: the normalized dimension must be >= 1")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor) -> None:
    rms_norm(x, w, 0.0)
    tensor("dy", dy, FLOATS)
    tensor("rstd", rstd, (torch.float32,))
    same_device(x=x, dy=dy, rstd=rstd)
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {tuple(dy.shape)}, x has {tuple(x.shape)}")
    if rstd.shape != x.shape[:-1]:
        raise ValueError(f"rstd has shape {tuple(rstd.shape)}, expected {tuple(x.shape[:-1])} (x without its last "
                         f"dimension)")


def swiglu(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor | None = None) -> None:
    tensor("gate", gate, FLOATS)
    tensor("up", up, FLOATS)
    if dh is not None:
        tensor("dh", dh, FLOATS)
    same_device(gate=gate, up=up, dh=dh)
    if gate.dim() < 1:
        raise ValueError("gate must have at least one dimension (features last)")
    if up.shape != gate.shape:
        raise ValueError(f"up has shape {tuple(up.shape)}, gate has {tuple(gate.shape)}: they must match")
    if dh is not None and dh.shape != gate.shape:
        raise ValueError(f"dh has shape {tuple(dh.shape)}, gate has {tuple(gate.shape)}: they must match")


# ------------------------------------------------------------------ attention ----

def _scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    # comparisons, not math.isfinite: under torch.compile with dynamic shapes the default
    # scale (head size ** -0.5) is a SymFloat, which math.isfinite cannot trace (NaN fails both)
    if not (0 < scale < math.inf):
        raise ValueError(f"scale must be finite and > 0, got {scale}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale, key_lengths=None, values: bool = True) -> None:
    """values=False (fake implementations): key_lengths' shape and dtype only, not its entries."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(name, t, FLOATS, dim=4)
    same_device(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)}, v has {tuple(v.shape)}: they must match")
    B, H, S, D = q.shape
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: every dimension must be >= 1")
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, S, D):
        raise ValueError(f"k has shape {tuple(k.shape)}, q has {tuple(q.shape)}: batch, positions and head size "
                         f"(dimensions 0, 2, 3) must match")
    if H % k.shape[1]:
        raise ValueError(f"q has {H} heads, k has {k.shape[1]}: query heads must be a multiple of key/value heads")
    _scale(scale)
    if key_lengths is not None:
        tensor("key_lengths", key_lengths, (torch.int32, torch.int64), dim=1)
        same_device(q=q, key_lengths=key_lengths)
        if key_lengths.shape[0] != B:
            raise ValueError(f"key_lengths has {key_lengths.shape[0]} entries, q a batch of {B}")
        # values only of a plain CPU tensor: a fake one (FakeTensorMode, tracing) has none to read
        if (values and type(key_lengths) is torch.Tensor and key_lengths.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            lo, hi = int(key_lengths.min()), int(key_lengths.max())
            if lo < 1 or hi > S:
                raise ValueError(f"key_lengths must lie in [1, {S}] (the positions of q), got values in [{lo}, {hi}]")


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, scale, key_lengths=None, values: bool = True) -> None:
    attention(q, k, v, scale, key_lengths, values)
    B, H, S, D = q.shape
    tensor("dout", dout, FLOATS, dim=4)
    tensor("out", out, FLOATS, dim=4)
    tensor("lse", lse, (torch.float32,), dim=3)
    same_device(q=q, dout=dout, out=out, lse=lse)
    for name, t in (("dout", dout), ("out", out)):
        if tuple(t.shape) != (B, S, H, D):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, S, H, D)} ([batch, positions, heads, "
                             f"head size])")
    if tuple(lse.shape) != (B, H, S):
        raise ValueError(f"lse has shape {tuple(lse.shape)}, expected {(B, H, S)}")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """q [B, H, S, D], k [B, Hk, S, D], cos and sin [1 or B, S, D], D even."""
    for name, t in (("q", q), ("k", k)):
        tensor(name, t, FLOATS, dim=4)
    for name, t in (("cos", cos), ("sin", sin)):
        tensor(name, t, FLOATS, dim=3)
    same_device(q=q, k=k, cos=cos, sin=sin)
    B, H, S, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, S, D):
        raise ValueError(f"k has shape {tuple(k.shape)}, q has {tuple(q.shape)}: batch, positions and head size "
                         f"(dimensions 0, 2, 3) must match")
    if D < 2 or D % 2:
        raise ValueError(f"the head size (q's last dimension) must be even and >= 2, got {D}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos has shape {tuple(cos.shape)}, sin has {tuple(sin.shape)}: they must match")
    if cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (S, D):
        raise ValueError(f"cos and sin have shape {tuple(cos.shape)}, expected {(B, S, D)} or {(1, S, D)} "
                         f"([batch or 1, positions, head size])")

