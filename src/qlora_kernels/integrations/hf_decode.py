"""A native decode step for transformers' Llama-family models (Llama, SmolLM2, Mistral-style
GQA, Phi-3) built on our layers, inside transformers' own ``generate``:
``enable_native_decode(model)``.

``generate`` then keeps its KV cache in a ``StaticCache`` (preallocated
``[1, kv_heads, max_len, head_size]`` per layer) and runs the prompt through the model's
own forward as before; each following one-token step, instead of ~15 Python-level
operator calls per layer, is one native call (csrc/decode.h) over every layer: RMSNorm,
the 4-bit (or dense) projections with their LoRA adapters, rotary embedding, the new key
and value written into the StaticCache's own tensors, grouped-query attention, SwiGLU,
the final norm. The head, the logits processors and the sampling stay transformers'.

What runs natively is checked, not assumed: the model type (``llama``, ``phi3``), each
norm and MLP probed against what the native step computes (integrations.hf_fuse's
probes), the attention class and scaling, each projection a ``Linear4bit`` in fp32
compute, a dense fp32 ``nn.Linear``, or a PEFT LoRA layer over one of them with one plain
adapter active, and no hooks or forwards of their own on the modules the step skips.
Anything else is refused by ``enable_native_decode`` with the reason; a step that is not
a plain one-token greedy/sampling step (a batch, a padded mask, another cache, autograd,
training mode, global module hooks, a position past a sliding window, a token id outside
the vocabulary, outputs asked for) runs the model's own forward and is counted in
``status(model)["fallbacks"]``.

The plan (pointers to every tensor the step reads) is made again at each prompt (each
generation), and every step first checks that none of those tensors was modified in
place or replaced by a new storage since (version counters and data pointers), that the
modules and the cache still hold those very tensors (a Parameter, quant state or cache
tensor rebound to a new object), that no module it skips got a hook or a forward of its
own, and that the modules it computes are the ones it planned (the same objects, norm
epsilons and activation, the same PEFT adapter state: active adapter, disabled, merged,
scaling); otherwise the step runs the model's own forward and the next one plans again
(a changed module is probed again first).

docs/onnx.md ("Our torch decode step") has the design and the numbers."""
from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
import operator
import types

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from .. import _C, formats, tuning
from .._versions import version_of
from .. import backends as _backends
from ..nn import Linear4bit
from . import hf_attention
from .hf_fuse import hooked, mlp_reason, mlp_style, norm_eps, norm_reason
from .onnx.errors import ExportError
from .onnx.genai import arch as _arch

log = logging.getLogger(__name__)

_ATTENTION = ("LlamaAttention", "MistralAttention", "Phi3Attention")
_LAYER = ("LlamaDecoderLayer", "MistralDecoderLayer", "Phi3DecoderLayer")
_STATE = "_qlora_kernels_native_decode"

# slots of csrc/decode_bindings.cpp
_ATTN, _O, _MLP, _DOWN = 0, 3, 4, 6


class NativeDecodeError(ValueError):
    """The model (or one of its layers) is not one the native decode step computes."""


def _lora_parts(m: nn.Module, what: str):
    """(base layer, (A, B, scaling, owners) or None) of a PEFT LoRA layer, or (m, None);
    owners: the (dict, key) pairs that hold the adapter's modules and weights."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no PEFT installed: no LoRA layers either
        return m, None
    if not isinstance(m, LoraLayer):
        return m, None
    if getattr(m, "fan_in_fan_out", False):
        raise NativeDecodeError(f"{what}: fan_in_fan_out LoRA layers are not supported")
    if m.disable_adapters:
        if m.merged:
            raise NativeDecodeError(f"{what}: adapters disabled while merged (the layer unmerges on its next call)")
        return m.get_base_layer(), None
    if m.merged_adapters:
        raise NativeDecodeError(f"{what}: merged adapters (unmerge them, or merge_and_unload the model)")
    active = [a for a in m.active_adapters if a in m.lora_A]
    if not active:
        return m.get_base_layer(), None
    if len(active) > 1:
        raise NativeDecodeError(f"{what}: {len(active)} adapters active at once ({active})")
    a = active[0]
    if a in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(a, False):
        raise NativeDecodeError(f"{what}: adapter {a!r} is DoRA (served by the model's own forward)")
    if getattr(m, "lora_bias", {}).get(a, False):
        raise NativeDecodeError(f"{what}: adapter {a!r} has a lora_bias")
    if m.training and float(getattr(m.lora_dropout[a], "p", 0.0)) > 0:
        raise NativeDecodeError(f"{what}: in training mode with LoRA dropout")
    lA, lB = m.lora_A[a], m.lora_B[a]
    A, B = lA.weight, lB.weight
    for name, t in (("lora_A", A), ("lora_B", B)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise NativeDecodeError(f"{what}: {name} of {a!r} is not a contiguous fp32 CPU tensor")
    if A.shape[0] > 256:
        raise NativeDecodeError(f"{what}: rank {A.shape[0]} > 256")
    owners = [(m._modules, "base_layer"), (m._modules, "lora_A"), (m._modules, "lora_B"), (m.lora_A._modules, a),
              (m.lora_B._modules, a), (lA._parameters, "weight"), (lB._parameters, "weight")]
    return m.get_base_layer(), (A, B, float(m.scaling[a]), owners)


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.is_contiguous()


class _Proj:
    """One projection's arguments of DecodePlan.set_proj and the tensors they point into."""

    def __init__(self, m: nn.Module, what: str):
        base, lora = _lora_parts(m, what)
        self.tensors: list = []  # watched between steps
        self.keep: list = []  # pointed into, kept alive, derived from watched ones
        # (dict, key) of every object the plan took from the modules: a Parameter, quant state
        # or adapter replaced by a new object (load_state_dict(assign=True)) leaves the old
        # ones unchanged, so their version counters and pointers alone would not tell
        self.owners: list = [(base._parameters, "weight"), (base._parameters, "bias")]
        if _hooked_here(base) or _hooked_here(m):
            raise NativeDecodeError(f"{what}: it has hooks")
        bias = getattr(base, "bias", None)
        if isinstance(base, Linear4bit):
            if base.compute != "fp32" or base.compute_dtype not in (None, torch.float32):
                raise NativeDecodeError(f"{what}: compute={base.compute!r}, compute_dtype={base.compute_dtype} "
                                        "(the native step computes in fp32)")
            p = base.prepared()
            if not (_plain(p.packed) and _plain(p.absmax)):
                raise NativeDecodeError(f"{what}: its packed weight is not a plain contiguous CPU tensor")
            with torch.inference_mode(False):  # a tensor with a version counter, also under inference_mode
                code = formats.codebook(p.quant_type)
            self.N, self.K = p.out_features, p.in_features
            w4 = (p.packed.data_ptr(), p.packed.numel(), p.absmax.data_ptr(), p.absmax.numel(), code.data_ptr(),
                  code.numel(), p.blocksize, 0, 0)
            # the plan reads the prepared bytes, decoded absmax and codebook; what they are made
            # from is what can change (prepared._sources: the layer's weight and quant state)
            self.keep += [p.packed, p.absmax, code]
            self.tensors += [t for t in p._sources if isinstance(t, torch.Tensor)]
            state = base.__dict__.get("quant_state")
            self.owners += [(base.__dict__, k) for k in ("quant_state", "compute", "compute_dtype")]
            # the tensors of prepared._sources (a state made nested gets a new absmax too)
            self.owners += [(state.__dict__, "absmax"), (state.__dict__, "code")]
            if state.state2 is not None:
                s2 = state.state2.__dict__
                self.owners += [(state.__dict__, "offset"), (state.__dict__, "state2"), (s2, "absmax"), (s2, "code")]
        elif type(base) is nn.Linear:
            w = base.weight
            if w.dtype != torch.float32 or not _plain(w):
                raise NativeDecodeError(f"{what}: a dense weight that is not contiguous fp32 on the CPU")
            self.N, self.K = base.out_features, base.in_features
            w4 = (0, 0, 0, 0, 0, 0, 0, w.data_ptr(), w.numel())
            self.tensors.append(w)
        else:
            raise NativeDecodeError(f"{what}: {type(base).__name__} is neither a qlora_kernels Linear4bit nor an "
                                    "nn.Linear")
        if bias is not None:
            if bias.dtype != torch.float32 or not _plain(bias):
                raise NativeDecodeError(f"{what}: its bias is not contiguous fp32 on the CPU")
            self.tensors.append(bias)
        b = (bias.data_ptr(), bias.numel()) if bias is not None else (0, 0)
        if lora is not None:
            A, B, s, owners = lora
            self.tensors += [A, B]
            self.owners += owners
            tail = (A.data_ptr(), A.numel(), B.data_ptr(), B.numel(), A.shape[0], s)
        else:
            tail = (0, 0, 0, 0, 0, 0.0)
        self.args = (self.N, self.K) + w4 + b + tail


def _capture_hook(h) -> bool:
    """transformers' output-capturing hook: installed for good on the decoder layers and
    attentions by the first call that asks for hidden states or attentions, inert unless a
    call asks for them again (such a call is not a native step, see _why_not)."""
    return (getattr(h, "__module__", None) == "transformers.utils.output_capturing"
            and getattr(h, "__name__", None) == "output_capturing_hook")


def _hooked_here(m: nn.Module) -> bool:
    return hooked(m, inert=_capture_hook)


def _norm_why(norm: nn.Module, eps: float) -> str | None:
    """hf_fuse's probe of a norm, and its epsilon the config's (the step uses that one)."""
    why = norm_reason(norm)
    if not why and norm_eps(norm) != eps:
        why = f"its eps {norm_eps(norm)} is not the config's rms_norm_eps {eps}"
    return why


def _module_keys(inner: nn.Module, a: "_arch.Arch") -> list:
    """What the plan assumes of the modules beyond their tensors, as (instance dict, key)
    pairs: which module objects it computes, the norms' epsilons, the activations, the
    attention scaling, each LoRA layer's adapter state (active, disabled, merged, training,
    scaling). Reading them is one dict lookup each, cheap enough for every step."""
    keys = [(inner._modules, "norm"), (inner._modules, "embed_tokens"), (inner._modules, "rotary_emb"),
            (inner._modules, "layers"), (inner.norm.__dict__, "variance_epsilon"), (inner.norm.__dict__, "eps"),
            (inner.norm.__dict__, "forward"), (inner.layers._modules, str(len(inner.layers)))]  # a layer appended
    for i, layer in enumerate(inner.layers):
        keys.append((inner.layers._modules, str(i)))
        attn, mlp = layer.self_attn, layer.mlp
        keys += [(layer._modules, n) for n in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")]
        keys += [(mlp._modules, "act_fn"), (mlp._modules, "activation_fn"), (attn.__dict__, "scaling")]
        # the forwards the probes ran (an instance's own, hf_fuse's fused MLP): probed again if replaced
        keys += [(m.__dict__, "forward") for m in (mlp, mlp._modules.get("act_fn"), mlp._modules.get("activation_fn"))
                 if m is not None]
        for n in ("input_layernorm", "post_attention_layernorm"):
            d = layer.get_submodule(n).__dict__
            keys += [(d, "variance_epsilon"), (d, "eps"), (d, "forward")]
        for path in a.projections(i).values():
            parent = attn if ".self_attn." in path else mlp
            name = path.rsplit(".", 1)[1]
            keys.append((parent._modules, name))
            m = parent._modules.get(name)
            if hasattr(m, "lora_A") and hasattr(m, "active_adapters"):  # a PEFT LoRA layer
                keys += [(m.__dict__, k) for k in ("_disable_adapters", "_active_adapter", "merged_adapters",
                                                    "training", "scaling")]
    return keys


_MISSING = object()
_FORWARD = itertools.repeat("forward")


def _module_values(keys: list, copy: bool = False) -> list:
    if not copy:
        return [d.get(k, _MISSING) for d, k in keys]
    return [v.copy() if isinstance(v, (list, dict)) else v for v in (d.get(k, _MISSING) for d, k in keys)]


_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
# the modules whose forward, an instance's own included (hf_fuse's fused MLP, hf_rope's
# rotary module), is what _check_structure probes or the rotary tables are read from
_PROBED = ("model.model", "model.norm", "model.rotary_emb")
_PROBED_IN_LAYER = ("input_layernorm", "post_attention_layernorm", "mlp", "mlp.act_fn", "mlp.activation_fn")


def _skipped(inner: nn.Module) -> list:
    """(name, module) of every module a native step runs in place of (the decoder itself
    too: its hooks are refused as before); containers are never called, so left out."""
    out = [("model.model", inner)]
    for name in ("embed_tokens", "norm", "rotary_emb"):
        out += [(f"model.{name}" + (f".{n}" if n else ""), m) for n, m in inner.get_submodule(name).named_modules()]
    for i, layer in enumerate(inner.layers):
        out += [(f"layer {i}.{n or '(itself)'}", m) for n, m in layer.named_modules()]
    return [(n, m) for n, m in out if not isinstance(m, _CONTAINERS)]


def _check_layers(inner: nn.Module, a: "_arch.Arch") -> list:
    """The decoder's layer count and its layer and attention classes, and no hooks or
    forwards of their own anywhere the native step would skip them (cheap: checked again
    at every plan). Returns _skipped(inner)."""
    n = len(inner.layers)
    if n != a.layers:  # the plan reads a.layers layers and cache layers
        raise NativeDecodeError(f"model.layers holds {n} layers, config.num_hidden_layers is {a.layers}")
    for i, layer in enumerate(inner.layers):
        if type(layer).__name__ not in _LAYER:
            raise NativeDecodeError(f"layer {i} is a {type(layer).__name__}; supported: {', '.join(_LAYER)}")
        attn = layer.self_attn
        if type(attn).__name__ not in _ATTENTION:
            raise NativeDecodeError(f"layer {i}'s attention is a {type(attn).__name__}; supported: "
                                    f"{', '.join(_ATTENTION)}")
    skipped = _skipped(inner)
    for name, m in skipped:
        if _hooked_here(m):
            raise NativeDecodeError(f"{name} has hooks, which the native step would not run")
        if "forward" in m.__dict__ and name not in _PROBED and (not name.startswith("layer ")
                                                                 or name.split(".", 1)[1] not in _PROBED_IN_LAYER):
            raise NativeDecodeError(f"{name} has a forward of its own, which the native step would not run")
    return skipped


def _check_structure(inner: nn.Module, a: "_arch.Arch") -> None:
    impl = getattr(inner.config, "_attn_implementation", "eager")
    if impl not in ("eager", "sdpa", hf_attention.NAME):
        raise NativeDecodeError(f"attention implementation {impl!r}: the native step replaces 'eager', 'sdpa' and "
                                f"{hf_attention.NAME!r}")
    _check_layers(inner, a)
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        if not math.isclose(float(getattr(attn, "scaling", a.head_size ** -0.5)), a.head_size ** -0.5, rel_tol=1e-7):
            raise NativeDecodeError(f"layer {i}'s attention scaling {attn.scaling} is not head_size ** -0.5")
        for name in ("input_layernorm", "post_attention_layernorm"):
            why = _norm_why(getattr(layer, name), a.eps)
            if why:
                raise NativeDecodeError(f"layer {i}.{name}: {why}")
        style = mlp_style(layer.mlp)
        why = "it is not a Llama or Phi-3 MLP" if style is None else mlp_reason(layer.mlp, style)
        if why:
            raise NativeDecodeError(f"layer {i}.mlp: {why}")
    why = _norm_why(inner.norm, a.eps)
    if why:
        raise NativeDecodeError(f"model.norm: {why}")
    emb = inner.embed_tokens
    if type(emb) is not nn.Embedding or emb.weight.dtype != torch.float32 or not _plain(emb.weight):
        raise NativeDecodeError("model.embed_tokens is not a plain fp32 nn.Embedding on the CPU")


class _Plan:
    """The native plan of one model over one StaticCache's tensors."""

    def __init__(self, state: "_State", inner: nn.Module, cache):
        a = state.arch
        # the rotary tables of the model's rotary module as it is now (a swapped module, or
        # its buffers edited, since the tables were made: made again, ~2 ms at SmolLM2's 8192
        # positions)
        rope = inner.rotary_emb
        key = [rope, rope.__dict__.get("forward")] + [(b.data_ptr(), b.dtype, version_of(b)) for b in rope.buffers()]
        if key != state.tables_key:
            try:
                state.tables = _arch.rotary_tables(types.SimpleNamespace(model=inner), a)
            except ExportError as e:
                raise NativeDecodeError(str(e)) from None
            state.tables_key = key
        cos, sin = state.tables
        norm = inner.norm
        skipped = [m for _, m in _check_layers(inner, a)]  # what can change cheaply since the probes
        keys = _module_keys(inner, a)
        snapshot = _module_values(keys, copy=True)
        if snapshot != state.probed:  # a module swapped or an adapter switched: probe again
            _check_structure(inner, a)
            state.probed = snapshot
        for what, t in (("model.norm", norm.weight), ("model.embed_tokens", inner.embed_tokens.weight)):
            if t.dtype != torch.float32 or not _plain(t):
                raise NativeDecodeError(f"{what}'s weight is not a contiguous fp32 CPU tensor")
        plan = _C.DecodePlan(a.layers, a.hidden, a.heads, a.kv_heads, a.head_size, a.intermediate, a.eps,
                             cos.data_ptr(), sin.data_ptr(), cos.numel(), cos.shape[0], norm.weight.data_ptr(),
                             norm.weight.numel())
        watched = [norm.weight, inner.embed_tokens.weight] + list(inner.rotary_emb.buffers())
        owners = [(norm._parameters, "weight"), (inner.embed_tokens._parameters, "weight"), (cache.__dict__, "layers")]
        owners += [(m._buffers, n) for m in rope.modules() for n in m._buffers] + [(rope.__dict__, "forward")]
        lens, cache_tensors, keep = [], [], []
        for i, layer in enumerate(inner.layers):
            n1, n2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            if not all(t.dtype == torch.float32 and _plain(t) for t in (n1, n2)):
                raise NativeDecodeError(f"layer {i}'s norm weights are not contiguous fp32 CPU tensors")
            plan.set_norms(i, n1.data_ptr(), n1.numel(), n2.data_ptr(), n2.numel())
            watched += [n1, n2]
            owners += [(layer.input_layernorm._parameters, "weight"), (layer.post_attention_layernorm._parameters,
                                                                         "weight")]
            roles = a.projections(i)
            attn_in = ["qkv"] if a.family == "phi3" else ["q", "k", "v"]
            mlp_in = ["gate_up"] if a.family == "phi3" else ["gate", "up"]
            for slots, names in ((_ATTN, attn_in), (_O, ["o"]), (_MLP, mlp_in), (_DOWN, ["down"])):
                at = 0
                for j, role in enumerate(names):
                    p = _Proj(inner.get_submodule(roles[role].removeprefix("model.")), roles[role])
                    plan.set_proj(i, slots + j, *p.args, at)
                    at += p.N
                    watched += p.tensors
                    keep += p.keep
                    owners += p.owners
            cl = cache.layers[i]
            k, v = cl.keys, cl.values
            plan.set_cache(i, k.data_ptr(), k.numel(), v.data_ptr(), v.numel(), k.shape[2])
            cache_tensors += [k, v]
            lens.append(cl.cumulative_length)
            # rebound by the cache itself (reorder_cache, batch_select_indices): the steps
            # would write into tensors the cache no longer reads
            owners += [(cl.__dict__, "keys"), (cl.__dict__, "values"), (cl.__dict__, "cumulative_length")]
        plan.finish(len(attn_in), len(mlp_in), a.head_size ** -0.5)
        self.plan, self.cache, self.lens, self.cache_tensors = plan, cache, lens, cache_tensors
        # every tensor the plan points into (kept alive here), a tied or shared one as often as
        # it is used: no identity-keyed dedup (tests/test_prepared.py), ~200 extra reads a step
        self.watched, self.keep = watched, keep
        # inference tensors (made under torch.inference_mode) have no version counter: their
        # pointers are watched
        self.versioned = [t for t in self.watched if not t.is_inference()]
        self.versions = [t._version for t in self.versioned]
        self.ptrs = [t.data_ptr() for t in self.watched] + [t.data_ptr() for t in self.cache_tensors]
        self.emb = inner.embed_tokens.weight
        self.tables = (cos, sin)  # the plan points into them
        self.module_keys, self.snapshot = keys, snapshot
        self.owner_dicts, self.owner_keys = [d for d, _ in owners], [k for _, k in owners]
        self.owned = list(map(dict.get, self.owner_dicts, self.owner_keys))
        self.cache_layers = list(cache.layers)
        # the forward hooks of every module the steps skip: none but transformers' inert
        # output-capturing ones (_check_layers), which stay as they are
        hook_dicts = [d for m in skipped for d in (m._forward_pre_hooks, m._forward_hooks)]
        self.no_hooks = [d for d in hook_dicts if not d]
        self.inert_hooks = [d for d in hook_dicts if d]
        self.inert_keys = [tuple(d) for d in self.inert_hooks]
        # the modules without a forward of their own, which must not get one (the probed ones
        # that have one: in the module keys)
        self.no_forward = [m.__dict__ for m in skipped if "forward" not in m.__dict__]

    def current(self) -> bool:
        # ~1000 tensors for SmolLM2 + LoRA: two list comprehensions, ~0.1 ms a step, and ~1000
        # dict lookups for the modules. The cache's tensors by pointer only: their contents
        # change with every step. Identities and hook dicts through map/any (C loops): a few
        # thousand of each, ~0.1 ms.
        layers = self.cache.layers
        return ([t._version for t in self.versioned] == self.versions
                and [t.data_ptr() for t in self.watched] + [t.data_ptr() for t in self.cache_tensors] == self.ptrs
                and all(map(operator.is_, map(dict.get, self.owner_dicts, self.owner_keys), self.owned))
                and len(layers) == len(self.cache_layers) and all(map(operator.is_, layers, self.cache_layers))
                and not any(self.no_hooks) and [tuple(d) for d in self.inert_hooks] == self.inert_keys
                and not any(map(operator.contains, self.no_forward, _FORWARD))
                and self._same_modules())

    def _same_modules(self) -> bool:
        return _module_values(self.module_keys) == self.snapshot


class _State:
    """What enable_native_decode keeps on the decoder: the model facts, the rotary tables,
    the current plan and the counters of status()."""

    def __init__(self, a: "_arch.Arch", tables):
        self.arch, self.tables = a, tables
        self.tables_key: list | None = None  # the rotary module and its buffers the tables come from
        self.plan: _Plan | None = None
        self.probed: list | None = None  # the _module_values that _check_structure last passed
        self.steps, self.fallbacks, self.last_fallback = 0, 0, None

    def __getstate__(self) -> dict:  # the plan holds this process's pointers
        d = dict(self.__dict__)
        d["plan"], d["probed"], d["tables_key"] = None, None, None
        return d


def _eligible_cache(cache, a) -> str | None:
    from transformers.cache_utils import StaticCache, StaticLayer

    if not isinstance(cache, StaticCache):
        return f"the cache is a {type(cache).__name__}, not a StaticCache"
    layers = getattr(cache, "layers", None)
    if not layers or len(layers) != a.layers:
        return "the cache does not have one layer per decoder layer"
    for cl in layers:
        if type(cl) is not StaticLayer or not cl.is_initialized:
            return "a cache layer is not an initialized StaticLayer (sliding or not yet filled by a prompt)"
        k, v = cl.keys, cl.values
        if (k.dtype != torch.float32 or v.dtype != torch.float32 or k.shape[0] != 1 or not k.is_contiguous()
                or not v.is_contiguous() or k.shape[1] != a.kv_heads or k.shape[3] != a.head_size
                or v.shape != k.shape or k.device.type != "cpu"):
            return "a cache layer is not [1, kv_heads, max_len, head_size] contiguous fp32 on the CPU"
    return None


def _plain_mask(mask, pos: int) -> bool:
    """Whether a one-token step's mask lets it see exactly what the native step attends to:
    the positions [0, pos] (a sliding window comes with a sliding cache layer, refused).
    generate passes a 2-D mask over the tokens so far with a DynamicCache, and with a
    StaticCache a 4-D one over the cache's length, bool (sdpa) or additive (eager)."""
    if mask is None:
        return True
    n = pos + 1
    if mask.dim() == 2:
        return mask.shape == (1, n) and bool(mask.all())
    if mask.dim() != 4 or mask.shape[:3] != (1, 1, 1) or mask.shape[3] < n:
        return False
    row = mask[0, 0, 0]
    if mask.dtype == torch.bool:
        seen, hidden = row, ~row
    else:  # additive: 0 where seen, the dtype's minimum (or -inf) where not
        seen, hidden = row == 0, row <= torch.finfo(mask.dtype).min / 2
    return bool(seen[:n].all()) and bool(hidden[n:].all())


def _why_not(inner: nn.Module, state: _State, input_ids, cache, kwargs: dict):
    """(None, plan, pos) when this call is a native decode step with that plan at that
    position, else (the reason it is not, None, None). The plan is read once: another
    thread may plan for its own cache meanwhile."""
    why = _why_not_plan(inner, state, input_ids, cache, kwargs)
    if isinstance(why, str):
        return why, None, None
    plan = why
    pos = int(plan.lens[0])
    if pos >= plan.plan.capacity or pos >= plan.tables[0].shape[0]:
        return (f"position {pos} is beyond the cache's {plan.plan.capacity} or the rotary table's "
                f"{plan.tables[0].shape[0]} positions"), None, None
    window = state.arch.sliding_window
    if 0 < window <= pos:  # the model's own mask hides the keys before the window, whatever mask is passed
        return f"position {pos} is beyond the sliding window of {window} positions", None, None
    return None, plan, pos


def _why_not_plan(inner: nn.Module, state: _State, input_ids, cache, kwargs: dict):
    if inner.training or torch.is_grad_enabled():
        return "training mode or autograd enabled"
    if input_ids is None or kwargs.get("inputs_embeds") is not None:
        return "no input_ids"
    if input_ids.shape != (1, 1):
        return f"input_ids of shape {tuple(input_ids.shape)} (a decode step is [1, 1])"
    if kwargs.get("use_cache") is False:
        return "use_cache=False"
    cfg = getattr(inner, "config", None)
    if any(kwargs.get(k, getattr(cfg, k, False)) for k in ("output_attentions", "output_hidden_states")):
        return "attentions or hidden states asked for"
    if _backends.get_backend() != "cpu":
        return f"backend {_backends.get_backend()!r} selected (the native step runs the cpu backend's kernels)"
    if _torch_module._global_forward_pre_hooks or _torch_module._global_forward_hooks:
        return "global module forward hooks (torch.nn.modules.module.register_module_forward_*hook)"
    plan = state.plan
    if plan is None or plan.cache is not cache:
        return _eligible_cache(cache, state.arch) or "no plan for this cache (a prompt runs first)"
    if not _plain_mask(kwargs.get("attention_mask"), int(plan.lens[0])):
        return "an attention mask other than the causal one (padding)"
    if not plan.current():
        return "a tensor or module the plan reads changed since it was made"
    return plan


def _forward(inner: nn.Module, input_ids=None, *args, **kwargs):
    """The decoder's forward with native one-token steps (the instance's own forward: the
    class is not patched)."""
    state: _State = inner.__dict__[_STATE]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    why, plan, pos = ("positional arguments", None, None) if args else _why_not(inner, state, input_ids, cache,
                                                                                   kwargs)
    if why is None:
        position_ids = kwargs.get("position_ids")
        token = int(input_ids)
        if position_ids is not None and int(position_ids.reshape(-1)[-1]) != pos:
            why = "position_ids that are not the cache's length"
        elif not 0 <= token < plan.emb.shape[0]:  # the model's own embedding raises; indexing would wrap
            why = f"token id {token} outside the embedding's {plan.emb.shape[0]} rows"
        else:
            if not tuning.ready:
                tuning.ensure()
            h = plan.emb[token].clone()
            plan.plan.step(h.data_ptr(), h.numel(), pos, torch.get_num_threads())
            for t in plan.lens:
                t.add_(1)
            state.steps += 1
            from transformers.modeling_outputs import BaseModelOutputWithPast

            return BaseModelOutputWithPast(last_hidden_state=h.view(1, 1, -1), cache=cache)
    one = input_ids is not None and input_ids.shape[-1] == 1
    if one:  # counted before the model's own forward, which may raise (a token id outside the vocabulary)
        state.fallbacks += 1
        state.last_fallback = why
    out = type(inner).forward(inner, input_ids, *args, **kwargs)
    # after a prompt into a StaticCache (or a step that could not run natively): plan the
    # steps that follow, from the model as it is now
    plan = state.plan
    if plan is None or plan.cache is not cache or not one or not plan.current():
        state.plan = None
        if (cache is not None and not inner.training and not torch.is_grad_enabled()
                and _eligible_cache(cache, state.arch) is None):
            try:
                state.plan = _Plan(state, inner, cache)
            except NativeDecodeError as e:  # a layer changed since enable_native_decode
                if one:
                    state.last_fallback = f"not planned: {e}"
    return out


def _head_forward(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The output head of a decode step (one row, no autograd) on the cpu backend's dense
    kernel, which streams the weight once (csrc/dense_pack.h: at one row it runs at the
    memory's bandwidth where torch's GEMV took 2-3x longer, docs/onnx.md); anything else is
    the layer's own forward."""
    w, b = head.weight, head.bias
    if (not torch.is_grad_enabled() and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu"
            and x.dim() >= 1 and x.shape[-1] == w.shape[1] and x.numel() == w.shape[1] and x.is_contiguous()
            and _plain(w) and (b is None or (b.dtype == torch.float32 and _plain(b)))
            and _backends.get_backend() == "cpu"):
        _, dense = _backends.kernel_for("linear_dense", "cpu")
        return dense(x.reshape(1, -1), w, b).view(*x.shape[:-1], w.shape[0])
    return type(head).forward(head, x)


def enable_native_decode(model: nn.Module, static_cache: bool = True) -> nn.Module:
    """Run ``model``'s one-token decode steps natively (see the module's docstring);
    ``model`` is a transformers Llama/Phi-3 causal LM (or a PEFT model around one) with
    qlora_kernels ``Linear4bit`` or fp32 ``nn.Linear`` projections and optional LoRA
    adapters. With ``static_cache``, plain greedy or sampling ``generate`` calls (no
    beams, no assisted decoding) that choose no cache themselves (no ``cache``/
    ``past_key_values``/``cache_implementation`` argument, none in the generation config)
    and do not ask for the cache back (``return_dict_in_generate``: a StaticCache sized for
    the call cannot be extended by the next turn; pass ``cache_implementation="static"`` to
    take the native step there anyway) get ``cache_implementation="static"`` (on a copy of a
    passed generation config): the native step needs a StaticCache. The model's generation config itself is not edited
    (``save_pretrained`` would write it out). Raises NativeDecodeError naming what is not
    supported. Returns ``model``."""
    lm = _arch.core_model(model)
    try:
        a = _arch.read(lm)
        tables = _arch.rotary_tables(lm, a)
    except ExportError as e:
        raise NativeDecodeError(str(e).replace("the ONNX Runtime GenAI export", "the native decode step")
                                .replace("the GenAI export", "the native decode step")) from None
    inner = getattr(lm, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise NativeDecodeError(f"{type(lm).__name__} has no model.layers")
    if _STATE in inner.__dict__:  # enabled before: start from the model's own forwards
        disable_native_decode(model)
    _check_structure(inner, a)
    for i in range(a.layers):  # every projection, as the plan will read it
        for role, path in a.projections(i).items():
            _Proj(lm.get_submodule(path), path)
    state = _State(a, tables)
    state.probed = _module_values(_module_keys(inner, a), copy=True)
    inner.__dict__[_STATE] = state
    inner.forward = functools.partial(_forward, inner)
    head = getattr(lm, "lm_head", None)
    if type(head) is nn.Linear and not hooked(head):
        head.forward = functools.partial(_head_forward, head)
    if static_cache and callable(getattr(type(lm), "generate", None)):
        lm.generate = functools.partial(_generate, lm)
    return model


def _plain_generation(lm: nn.Module, passed, kwargs: dict) -> bool:
    """Whether generate will run a plain greedy or sampling loop over a cache it chooses
    itself: the generation mode of the config generate would make (the passed one, its
    unset values the model's, the call's arguments over both), no cache chosen. Assisted
    decoding (prompt lookup, an assistant model, early exit) sizes its own cache use past
    a StaticCache's max_length; beams are batches, which the native step does not take."""
    from transformers.generation.configuration_utils import GenerationMode

    if any(k in kwargs for k in ("cache", "past_key_values", "cache_implementation")):
        return False
    if kwargs.get("assistant_model") is not None or kwargs.get("custom_generate") is not None:
        return False
    own = getattr(lm, "generation_config", None)
    base = passed if passed is not None else own
    if base is None:
        return False
    probe = copy.copy(base)  # set on, not updated: update() validates and warns, as generate will itself
    if passed is not None and own is not None:
        for k, v in vars(own).items():
            if getattr(probe, k, None) is None:
                setattr(probe, k, v)
    for k, v in kwargs.items():
        if hasattr(probe, k):
            setattr(probe, k, v)
    if probe.use_cache is False or probe.cache_implementation is not None:
        return False
    # The caller gets the cache back (out.past_key_values) and may pass it to the next turn
    # with a longer prompt: a StaticCache sized for this call cannot grow (IndexError in the
    # next generate), the DynamicCache transformers would have chosen can.
    if getattr(probe, "return_dict_in_generate", False):
        return False
    return probe.get_generation_mode() in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


def _generate(lm: nn.Module, *args, **kwargs):
    """The model's generate, with a StaticCache where the call is a plain greedy or
    sampling one choosing no cache and not asking for it back (enable_native_decode). A caller's generation config
    gets it on a copy: next to a generation config, transformers deprecates generation
    arguments."""
    passed = kwargs["generation_config"] if "generation_config" in kwargs else (args[1] if len(args) > 1 else None)
    if _plain_generation(lm, passed, kwargs):
        if passed is None:
            kwargs["cache_implementation"] = "static"
        else:
            gc = copy.deepcopy(passed)
            gc.cache_implementation = "static"
            if "generation_config" in kwargs:
                kwargs["generation_config"] = gc
            else:
                args = args[:1] + (gc,) + args[2:]
    return type(lm).generate(lm, *args, **kwargs)


def disable_native_decode(model: nn.Module) -> nn.Module:
    """Undo enable_native_decode (the model's own forward, head and generate)."""
    lm = _arch.core_model(model)
    inner = lm.model
    inner.__dict__.pop(_STATE, None)
    inner.__dict__.pop("forward", None)
    if isinstance(lm.__dict__.get("generate"), functools.partial):
        del lm.generate
    head = getattr(_arch.core_model(model), "lm_head", None)
    if head is not None and isinstance(head.__dict__.get("forward"), functools.partial):
        del head.forward
    return model


def status(model: nn.Module) -> dict:
    """{"enabled", "steps" (native), "fallbacks" (one-token calls that ran the model's own
    forward), "last_fallback" (its reason)}."""
    inner = getattr(_arch.core_model(model), "model", None)
    state = getattr(inner, "__dict__", {}).get(_STATE)
    if state is None:
        return {"enabled": False, "steps": 0, "fallbacks": 0, "last_fallback": None}
    return {"enabled": True, "steps": state.steps, "fallbacks": state.fallbacks, "last_fallback": state.last_fallback}
