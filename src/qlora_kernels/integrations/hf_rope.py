"""The fused rotary embedding (ops/rope.py) inside a Hugging Face model, opt-in through
``fuse_layers`` (``fuse_rope(model)`` alone).

transformers' attention layers call their modeling file's ``apply_rotary_pos_emb(q, k, cos,
sin)``. Two cases:

* With the ``kernels`` package (a dependency of transformers 5), files whose attention
  class is decorated ``use_kernelized_func(apply_rotary_pos_emb)`` (Llama, Mistral, Qwen2,
  SmolLM2, ...) give every attention instance a private wrapper of the function, whose
  ``forward`` ``kernels.kernelize`` replaces per model. The fused model's wrappers get
  their ``forward`` replaced the same way: nothing outside the model changes.
* Other files (Phi-3's) call a plain module-level function, with no per-model hook, so
  Liger-Kernel and Unsloth replace it in the modeling module. Here the replacement is
  inert for every model but the fused ones: it takes the kernel only when ``cos`` carries
  a mark that the fused model's own rotary embedding module puts on the tensors it returns
  (that instance gets its own ``forward``, as fused MLPs do), and otherwise calls
  transformers' function, so another model of the same class (a peer in a benchmark, a
  reference in a test) keeps transformers' computation.

Before anything is replaced the function is probed: on random inputs (fp32 and bf16, both
layouts of ``unsqueeze_dim``) its output must equal ``x * cos + rotate_half(x) * sin`` over
the whole head bit for bit, else the model is left alone with the reason. The kernel then
runs where training needs it (fp32 CPU tensors, autograd recording, cos of the head size,
``unsqueeze_dim=1``); everything else (inference, a decode step, bf16, traced code) computes
transformers' formula: their function, or in the first case the same torch ops."""
from __future__ import annotations

import functools
import importlib
import logging
import sys
from types import MethodType

import torch
from torch import nn

from ..backends.reference import rope_formula

log = logging.getLogger(__name__)

_MARK = "_qlora_kernels_rope"  # on the cos tensors of a fused model's rotary embedding
_MODULE = "_qlora_kernels_rope_module"  # on fused wrapper classes: the modeling module
_ORIGINAL = "_qlora_kernels_original"  # on the replacement: transformers' function
_FUNC = "apply_rotary_pos_emb"


def _takes(q, k, cos, sin, args, kwargs) -> bool:
    """Whether the fused kernel computes this call (as transformers' function would)."""
    if args not in ((), (1,)) or kwargs not in ({}, {"unsqueeze_dim": 1}):
        return False
    if not torch.is_grad_enabled():
        return False
    ts = (q, k, cos, sin)
    if not all(type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu" for t in ts):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    B, _, S, D = q.shape
    return (q.requires_grad or k.requires_grad) and not (cos.requires_grad or sin.requires_grad) and \
        D % 2 == 0 and cos.shape[0] in (1, B) and tuple(cos.shape[1:]) == (S, D) and \
        (k.shape[0], k.shape[2], k.shape[3]) == (B, S, D)


def _replacement(original):
    from ..functional import rope

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # traced code (torch.compile) never takes the kernel: tensor attributes are not traced
        if not torch.compiler.is_compiling() and getattr(cos, _MARK, False) and _takes(q, k, cos, sin, args,
                                                                                        kwargs):
            return rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, _ORIGINAL, original)
    return apply_rotary_pos_emb


def _same(want, got) -> bool:
    return isinstance(want, tuple) and len(want) == 2 and all(
        isinstance(w, torch.Tensor) and w.dtype == o.dtype and w.shape == o.shape and torch.equal(w, o)
        for w, o in zip(want, got))


def _probe(fn) -> str | None:
    """None when ``fn(q, k, cos, sin[, unsqueeze_dim])`` equals the fused op and rope_formula bit
    for bit on random inputs: transformers' cos/sin layout and arbitrary values, grouped
    query heads, fp32 and bf16, [B, H, S, D] and [B, S, H, D] inputs."""
    from ..functional import rope

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    freqs = torch.randn(2, 7, 8, generator=g)
    tables = [(torch.cat((freqs.cos(), freqs.cos()), -1), torch.cat((freqs.sin(), freqs.sin()), -1)),
              (torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g))]
    why = "its apply_rotary_pos_emb does not compute x * cos + rotate_half(x) * sin over the whole head"
    try:
        with torch.no_grad():
            for cos, sin in tables:
                want = fn(q, k, cos, sin)
                if not (_same(want, rope(q, k, cos, sin)) and _same(want, rope_formula(q, k, cos, sin))):
                    return why
                qb, kb, cb, sb = (t.to(torch.bfloat16) for t in (q, k, cos, sin))
                if not _same(fn(qb, kb, cb, sb), rope_formula(qb, kb, cb, sb)):
                    return why
                qt, kt = q.transpose(1, 2), k.transpose(1, 2)
                if not _same(fn(qt, kt, cos, sin, unsqueeze_dim=2), rope_formula(qt, kt, cos, sin, unsqueeze_dim=2)):
                    return why
    except Exception as e:  # another signature (Gemma 4's one tensor, GPT-J's (x, sin, cos)), a half-width cos
        return f"its apply_rotary_pos_emb does not take (q, k, cos, sin) as Llama's does ({type(e).__name__}: {e})"
    return None


def _private_forward(self, q, k, cos, sin, *args, **kwargs):
    """The forward of a fused model's private apply_rotary_pos_emb wrapper (kernels). Under
    torch.compile kernels calls it with the global wrapper as self: it reads nothing of self."""
    if not torch.compiler.is_compiling() and _takes(q, k, cos, sin, args, kwargs):
        from ..functional import rope

        return rope(q, k, cos, sin)
    return rope_formula(q, k, cos, sin, *args, **kwargs)


def _rotary_forward(self, *args, **kwargs):
    out = type(self).forward(self, *args, **kwargs)
    pair = isinstance(out, tuple) and len(out) == 2 and all(type(t) is torch.Tensor for t in out)
    if pair and not torch.compiler.is_compiling():
        setattr(out[0], _MARK, True)
    return out


def _install(module_name: str) -> str | None:
    """Replace ``apply_rotary_pos_emb`` in one modeling module (once); None, or why not."""
    mod = sys.modules.get(module_name)
    fn = getattr(mod, _FUNC, None)
    if not callable(fn):
        return f"its modeling module {module_name} has no {_FUNC}"
    if hasattr(fn, _ORIGINAL):
        return None
    why = _probe(fn)
    if why is None:
        setattr(mod, _FUNC, _replacement(fn))
    return why


def is_rotary(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RotaryEmbedding") and callable(getattr(type(m), "forward", None))


def _private_wrapper(m: nn.Module):
    """(m's dict of kernels wrappers, the key of its wrapper of its modeling module's
    apply_rotary_pos_emb), or None: kernels keeps one wrapper per instance, of the global
    wrapper's class (or of our subclass of it, once fused)."""
    funcs = m.__dict__.get("_kernel_funcs")
    fn = getattr(sys.modules.get(type(m).__module__), _FUNC, None)
    if not isinstance(funcs, dict) or not isinstance(fn, nn.Module):
        return None
    key = next((k for k, w in funcs.items() if isinstance(w, type(fn))), None)
    return None if key is None else (funcs, key)


def _is_ours(w: nn.Module) -> bool:
    return getattr(type(w), _MODULE, None) is not None


_FUSED_TYPES: dict[type, type] = {}


def _fused_type(base: type, module_name: str) -> type:
    """kernels' wrapper class with the fused forward as its class's own. An instance
    attribute (what ``kernelize`` itself sets) would not last: transformers re-runs
    ``kernelize`` on every ``train()`` / ``eval()`` that changes the mode of a model loaded
    with ``from_pretrained`` (``use_kernels`` is on by default in transformers 5), and with no
    kernel mapped for the device it resets each wrapper to its class's forward."""
    t = _FUSED_TYPES.get(base)
    if t is None:
        t = type(base.__name__, (base,), {"forward": _private_forward, "__reduce__": _fused_reduce,
                                          _MODULE: module_name, "__module__": __name__,
                                          "__qualname__": f"fused_rope({base.__qualname__})"})
        _FUSED_TYPES[base] = t
    return t


def _own_forward(w: nn.Module):
    """The function of a forward bound to w itself (what kernelize sets), or None."""
    f = w.__dict__.get("forward")
    return f.__func__ if isinstance(f, MethodType) and f.__self__ is w else None


def _fused_reduce(self):
    # kernels' __reduce__ rebuilds its own class, which would drop the fusion on torch.load;
    # the state is kept in the form its __setstate__ takes: (dict, forward set by kernelize)
    state, forward_func = self.__dict__.copy(), _own_forward(self)
    if forward_func is not None:
        del state["forward"]
    return _rebuild_fused, (getattr(type(self), _MODULE),), (state, forward_func)


def _rebuild_fused(module_name: str):
    fn = getattr(importlib.import_module(module_name), _FUNC)
    return _fused_type(type(fn), module_name)()


def _swap(funcs: dict, key, cls: type) -> None:
    """Replace the wrapper funcs[key] by an instance of ``cls`` with the same state (hooks,
    mode, and a forward kernelize set, rebound to the new instance as kernels' copy does)."""
    old = funcs[key]
    new = cls()
    state = dict(old.__dict__)
    if (f := _own_forward(old)) is not None:
        state["forward"] = MethodType(f, new)
    new.__dict__.update(state)
    funcs[key] = new


def fuse_rope(model: nn.Module) -> tuple[int, list]:
    """Let the attention layers of every transformers model inside ``model`` apply the fused
    rotary embedding. Returns (modules switched: private wrappers of attention layers and
    rotary embedding modules, [(name, reason), ...] of the ones left alone)."""
    fused, skipped = 0, []
    for name, m in model.named_modules():
        found = _private_wrapper(m)
        if found is not None and not _is_ours(found[0][found[1]]):
            w = found[0][found[1]]
            # called outside its attention layer, the wrapper runs transformers' function
            why = "kernelize replaced its apply_rotary_pos_emb already" if "forward" in w.__dict__ else _probe(w)
            if why is None:
                _swap(*found, _fused_type(type(w), type(m).__module__))
                fused += 1
            else:
                skipped.append((name, why))
        if not is_rotary(m) or isinstance(m.__dict__.get("forward"), functools.partial):
            continue
        fn = getattr(sys.modules.get(type(m).__module__), _FUNC, None)
        if isinstance(fn, nn.Module):
            continue  # kernels' wrapper: its attention layers are switched one by one (above)
        why = _install(type(m).__module__)
        if why is None and "forward" in m.__dict__:
            why = "it has a forward of its own already"
        if why is None:
            m.forward = functools.partial(_rotary_forward, m)  # a partial: torch.save pickles it
            fused += 1
        else:
            skipped.append((name, why))
    for name, why in skipped:
        log.info("qlora-kernels: %s: rotary embedding not fused: %s", name, why)
    return fused, skipped


def unfuse_rope(model: nn.Module) -> None:
    """Back to transformers' rotary embedding (a replaced module-level function stays:
    without the mark it calls transformers' own)."""
    for m in model.modules():
        found = _private_wrapper(m)
        if found is not None and _is_ours(found[0][found[1]]):
            _swap(*found, type(getattr(sys.modules[type(m).__module__], _FUNC)))
        f = m.__dict__.get("forward")
        if is_rotary(m) and isinstance(f, functools.partial) and f.func is _rotary_forward:
            del m.forward
