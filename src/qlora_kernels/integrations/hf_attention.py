"""The fused causal attention (ops/attention.py) as a transformers attention
implementation, opt-in: ``fuse_attention(model)``.

transformers' decoders (Llama, Mistral, Qwen2, Phi-3, ...) call their attention through
``AttentionInterface`` by the name in ``config._attn_implementation``; this registers
``"qlora_kernels"`` there (and sdpa's mask function under the same name in
``AttentionMaskInterface``, so an unpadded batch reaches the attention with no mask, as
with sdpa) and switches the model to it with ``set_attn_implementation``. A call takes the
fused kernels when it is causal self-attention: CPU fp32 tensors, as many queries as keys,
no mask or the mask of a right-padded batch (sequences padded at the end, what training
collators write: the kernel masks the keys past each sequence's length exactly as the mask
does), no dropout, softcap, attention sinks or position bias, weights not asked for.
Anything else (left padding, other mask patterns, a KV cache during generation, ...) runs
transformers' own sdpa attention, counted by reason in ``fallbacks()``."""
from __future__ import annotations

import collections
import sys
import threading
import weakref

import torch
from torch import nn

from .. import ops

NAME = "qlora_kernels"

_counts: collections.Counter = collections.Counter()
_lock = threading.Lock()
# keyword arguments that change what attention computes; anything else (position ids, the
# cache position, sliding_window: sdpa reads the window from the mask alone) is ignored as
# sdpa ignores it
_CHANGES_RESULT = ("softcap", "position_bias", "s_aux", "sinks")
# sparse attention's selected keys (DeepSeek-V3.2 and the other indexer models): their modeling
# code folds the selection into the mask only for 'eager' and 'sdpa' and hands it to any other
# implementation to apply; neither the fused kernel nor the sdpa fallback can
_SPARSE_SELECTION = ("indices", "block_indices")


def _count(key: str) -> None:
    # not while torch.compile traces: dynamo cannot trace the lock (a fullgraph compile of the
    # model would fail on it), and a traced count would run once per compilation, not per call
    if torch.compiler.is_compiling():
        return
    with _lock:
        _counts[key] += 1


def fallbacks() -> dict:
    """Calls since import (or ``reset_counts``): ``{"fused": n, reason: n, ...}``."""
    with _lock:
        return dict(_counts)


def reset_counts() -> None:
    with _lock:
        _counts.clear()


# The last mask analysed (a weak reference, its version) and its key lengths: every layer of
# a forward is handed the same mask tensor, so it is compared once per forward, not once per
# layer. Inference tensors have no version counter: their masks are compared every time.
_last_mask: tuple = (None, -1, None)
# Query rows of the mask compared per piece: the expected pattern is built a block at a time
# (a whole [B, S, S] copy would be 134 MB at B=8, S=4096).
_ROWS_PER_PIECE_ELEMENTS = 1 << 22


def _right_padding_lengths(mask: torch.Tensor, B: int, S: int) -> torch.Tensor | None:
    """Each sequence's length when ``mask`` is the sdpa mask of a right-padded causal batch
    (boolean [B, 1, S, S], True where query i may see key j: j <= i and j < length[b], every
    length >= 1); None for any other mask."""
    global _last_mask
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, 1, S, S) or mask.device.type != "cpu":
        return None
    versioned = not mask.is_inference()
    ref, version, lengths = _last_mask
    if versioned and ref is not None and ref() is mask and version == mask._version:
        return lengths
    lengths = mask[:, 0, -1, :].sum(-1)  # the last query sees exactly the first length[b] keys
    if int(lengths.min()) < 1:
        lengths = None  # a fully padded row: sdpa's output there is not what the kernel would give
    else:
        pos = torch.arange(S)
        valid_keys = pos < lengths[:, None, None]  # [B, 1, S]
        step = max(1, _ROWS_PER_PIECE_ELEMENTS // max(1, B * S))
        for r0 in range(0, S, step):
            rows = pos[r0:r0 + step, None]
            if not torch.equal(mask[:, 0, r0:r0 + step], (rows >= pos) & valid_keys):
                lengths = None
                break
    if versioned:
        _last_mask = (weakref.ref(mask), mask._version, lengths)
    return lengths


def _why_not(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
    """(None, key lengths or None) when the kernel takes the call, else (reason, None)."""
    for name in _SPARSE_SELECTION:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"attention {NAME!r} was handed {name}= (sparse attention's selected keys), which neither it nor "
                f"sdpa applies: keep this model on 'sdpa' (fuse_attention leaves such models alone)")
    why = _why_not_shapes(module, query, key, value, dropout, is_causal, kwargs)
    if why is not None or attention_mask is None:
        return why, None
    if torch.compiler.is_compiling():  # the comparison below is data-dependent control flow
        return "an attention mask under torch.compile", None
    lengths = _right_padding_lengths(attention_mask, query.shape[0], query.shape[2])
    if lengths is None:
        return "an attention mask other than right padding", None
    return None, lengths


def _why_not_shapes(module, query, key, value, dropout, is_causal, kwargs) -> str | None:
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        return "not causal"
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (query, key, value)):
        return "not fp32 CPU tensors"
    if query.dim() != 4 or key.dim() != 4 or query.shape[2] != key.shape[2]:
        return "queries and keys differ in number (a KV cache)"
    if dropout:
        return "attention dropout"
    if kwargs.get("output_attentions"):
        return "attention weights asked for"
    for name in _CHANGES_RESULT:
        if kwargs.get(name) is not None:
            return name
    # (sdpa broadcasts a batch of 1 and takes empty tensors; the kernel does neither)
    if (query.numel() == 0 or key.numel() == 0 or query.shape[0] != key.shape[0] or query.shape[1] % key.shape[1]
            or key.shape != value.shape or query.shape[-1] != key.shape[-1]):
        return "head counts or sizes the kernel does not pair"
    return None


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: q [B, H, S, D], k, v [B, Hk, S, D] ->
    (output [B, S, H, D], None)."""
    why, lengths = _why_not(module, query, key, value, attention_mask, dropout, is_causal, kwargs)
    if why is None:
        _count("fused" if lengths is None else "fused (right padding)")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return ops.attention.causal_attention_call(query, key, value, float(scale), lengths)[0], None
    _count(why)
    if kwargs.get("output_attentions"):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        weighed = _eager_with_weights(module, query, key, value, attention_mask, dropout, scaling, causal, kwargs)
        if weighed is not None:
            return weighed
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _eager_with_weights(module, query, key, value, attention_mask, dropout, scaling, causal, kwargs):
    """The model's own eager attention, where the caller asks for the attention weights:
    sdpa returns none, and an 'eager' model fused here had them before. The mask this
    implementation gets is sdpa's (boolean, or None: plain causal where the call is causal,
    every key otherwise, as in an encoder or cross-attention); eager adds a float one. None
    where the model's module has no eager function (sdpa then, weights None)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        return None
    q_len, k_len = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is None and causal:  # sdpa's is_causal: query i sees the keys up to its own position, the last q_len aligned
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return eager(module, query, key, value, mask, scaling=scale, dropout=dropout, **kwargs)


def register() -> None:
    """Make ``attn_implementation="qlora_kernels"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


# A model fused earlier and unpickled (torch.save of the whole model) names this
# implementation in its config; unpickling imports this module through the fused modules,
# so registering here makes it runnable again in a fresh process.
try:
    register()
except ImportError:  # no transformers: nothing names the implementation
    pass


def _pretrained_roots(model: nn.Module):
    """The outermost transformers models inside ``model`` (itself, or the one a PEFT model wraps)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    roots, inside = [], set()
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(name.startswith(p) for p in inside):
            roots.append(m)
            inside.add(name + "." if name else "")
    return roots


def _slices_shared_kv_queries(root: nn.Module) -> bool:
    """Gemma 4's KV-shared layers (``_maybe_slice_kv_shared_inputs``): unless the attention
    implementation is named 'sdpa', they keep only the last ``logits_to_keep`` queries (and
    also with a static cache) while the causal mask stays None, which no attention function
    handed q_len < kv_len and no mask can tell from a prefill into a static cache; sdpa's
    fallback would align the causal mask top-left, i.e. wrongly."""
    return (any(callable(getattr(type(m), "_maybe_slice_kv_shared_inputs", None)) for m in root.modules())
            and any(getattr(m, "is_kv_shared_layer", False) for m in root.modules()))


def why_not_fusable(model: nn.Module) -> str | None:
    """Why ``fuse_attention`` would leave this model alone (None: it can switch it)."""
    roots = _pretrained_roots(model)
    if not roots:
        return "no transformers model inside"
    for r in roots:
        impl = getattr(r.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager", NAME):
            return f"its attention implementation is {impl!r} (only 'sdpa' and 'eager' are replaced)"
        if not getattr(r, "_supports_sdpa", False):
            # every call the kernel does not take falls back to sdpa: GPT-OSS's sinks would be
            # dropped, Gemma 2's softcapping refused
            return f"{type(r).__name__} does not support sdpa, the fallback of what the kernel does not take"
        if any(isinstance(getattr(m, "indexer", None), nn.Module) for m in r.modules()):
            return ("sparse attention (an indexer selects the keys): its modeling code applies the selection "
                    "only under 'eager' and 'sdpa'")
        if _slices_shared_kv_queries(r):
            return ("its KV-shared layers drop queries without a mask under any attention implementation but "
                    "'sdpa' (Gemma 4)")
    return None


_BEFORE = "_qlora_kernels_attn_before"


def fuse_attention(model: nn.Module) -> str | None:
    """Switch every transformers model inside ``model`` from 'sdpa' or 'eager' attention to
    the fused kernels (``set_attn_implementation``: the model's config says so afterwards;
    ``save_pretrained`` does not write the choice, as for any implementation name, so a
    saved model loads with transformers' default). ``unfuse_attention`` switches back to
    what the model had. Returns None, or why the model was left alone."""
    why = why_not_fusable(model)
    if why is not None:
        return why
    register()
    for r in _pretrained_roots(model):
        impl = r.config._attn_implementation
        if impl != NAME:
            setattr(r, _BEFORE, impl)
            r.set_attn_implementation(NAME)
    return None


def unfuse_attention(model: nn.Module) -> None:
    """Back to the implementation each model had before ``fuse_attention`` ('sdpa' if unknown)."""
    for r in _pretrained_roots(model):
        if getattr(r.config, "_attn_implementation", None) == NAME:
            r.set_attn_implementation(getattr(r, _BEFORE, "sdpa"))
