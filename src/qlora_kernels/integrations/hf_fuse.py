"""The fused RMSNorm and SwiGLU (ops/norm_act.py) inside a Hugging Face model, opt-in:
``fuse_layers(model)``.

* Every ``*RMSNorm`` instance whose output is LlamaRMSNorm's (``weight * normed``) is
  replaced in its parent by a :class:`qlora_kernels.nn.RMSNorm` holding the same weight
  Parameter and eps: same state-dict key, same optimizer parameter. Gemma's ``(1 + weight)
  * normed`` and anything else that computes otherwise is left alone.
* The rotary embedding of queries and keys (hf_rope.py) and the causal attention
  (hf_attention.py) of every transformers model inside.
* Every Llama-style MLP (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: Llama, Mistral,
  Qwen2) and Phi-3-style MLP (``gate_up_proj``, then the halves) with a SiLU activation
  gets its own ``forward`` (the instance's, as integrations.hf_loss does; no class is
  patched) that calls ``swiglu`` on the projections' outputs, whatever wraps the
  projections (PEFT LoRA layers included).

Whether a module computes what the replacement computes is not read from its class name
alone: each candidate is run once on a small probe input (eval mode, no autograd) and
compared with the fused computation; a module that disagrees is skipped with the reason.
Outside the fast case (fp32 CPU tensors) both fall back to the original math."""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import RMSNorm
from .hf_attention import fuse_attention
from .hf_rope import fuse_rope

log = logging.getLogger(__name__)

_FLAG = "_qlora_kernels_fused_mlp"


def _fast(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.dtype == up.dtype == torch.float32 and gate.device.type == up.device.type == "cpu"


def _act_mul(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # The fused op where autograd records (training: one pass each way, no silu(gate) kept);
    # without autograd the module's own two ops, which at decode's one row cost less than
    # the op's dispatch (2.5 us against 20 us) and give transformers' bits.
    if _fast(gate, up) and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return ops.norm_act.swiglu_call(gate, up)
    return act(gate) * up


def _llama_mlp_forward(self, x):
    return self.down_proj(_act_mul(self.act_fn, self.gate_proj(x), self.up_proj(x)))


def _phi3_mlp_forward(self, hidden_states):
    gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
    return self.down_proj(_act_mul(self.activation_fn, gate, up))


_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")
_PHI3_MLP = ("gate_up_proj", "down_proj", "activation_fn")


def mlp_style(m: nn.Module):
    """(forward, activation) of the fused MLP this module would get, or None."""
    if all(isinstance(getattr(m, a, None), nn.Module) for a in _LLAMA_MLP):
        return _llama_mlp_forward, m.act_fn
    if all(isinstance(getattr(m, a, None), nn.Module) for a in _PHI3_MLP):
        return _phi3_mlp_forward, m.activation_fn
    return None


def hooked(m: nn.Module, inert=None) -> bool:
    """Hooks on the module itself: a replacement would drop them (norms) or they would see
    another computation than the one they were registered for. ``inert(hook)``: forward
    hooks the caller knows do nothing for the calls it replaces (not counted)."""
    if any(getattr(m, h, None) for h in ("_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                                         "_forward_hooks_with_kwargs")):
        return True
    forward = getattr(m, "_forward_hooks", None) or {}
    return any(inert is None or not inert(h) for h in forward.values())


def norm_eps(m: nn.Module):
    """A norm's epsilon, under either of the names transformers' norms use."""
    return getattr(m, "variance_epsilon", getattr(m, "eps", None))


@contextlib.contextmanager
def _probing(m: nn.Module, training: bool = False):
    """Eval mode (no dropout; or training mode) and no autograd while a module is probed;
    modes restored."""
    modes = [(s, s.training) for s in m.modules()]
    m.train(training)
    try:
        with torch.no_grad():
            yield
    finally:
        for s, mode in modes:
            s.training = mode


def _device_dtype(m: nn.Module):
    """Where the module computes, and in what (a 4-bit layer's packed uint8 weight says nothing)."""
    p = next(m.parameters(), None)
    f = next((q for q in m.parameters() if q.is_floating_point()), None)
    return (None if p is None else p.device), (torch.float32 if f is None else f.dtype)


def _agrees(a, b: torch.Tensor) -> bool:
    return (isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and bool(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5)))


_PROBE_ERRORS = (RuntimeError, TypeError, ValueError, AttributeError, IndexError)


def norm_reason(m: nn.Module) -> str | None:
    w = getattr(m, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1 or w.numel() < 1:
        return "its weight is not a 1-D Parameter"
    if len(list(m.parameters())) != 1 or list(m.buffers()) or list(m.children()):
        return "it holds more than its weight"
    eps = norm_eps(m)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return "it has no float eps (variance_epsilon or eps)"
    if w.device.type == "meta":
        return "its weight is on the meta device"
    if hooked(m):
        return "it has hooks, which a replacement module would not carry"
    ours = RMSNorm(w.numel(), float(eps), w)
    g = torch.Generator().manual_seed(0)
    # rows at three scales, the smallest where eps matters
    x = torch.randn(3, w.numel(), generator=g) * torch.tensor([[1.0], [1e-3], [30.0]])
    x = x.to(w.device, w.dtype)
    with _probing(m):
        if not _agrees(m.forward(x), ours(x)):  # forward: the probe fires no hooks
            return "its output is not weight * x * rsqrt(mean(x^2) + eps) (e.g. Gemma's (1 + weight))"
        # outside the fast case the replacement runs LlamaRMSNorm's math: it must be this
        # class's to the bit, roundings to a half-precision input dtype included
        xb = x.to(torch.bfloat16)
        if not torch.equal(m.forward(xb), ours(xb)):
            return "its bf16 rounding differs from LlamaRMSNorm's"
    return None


def mlp_reason(m: nn.Module, style) -> str | None:
    forward, act = style
    names = _LLAMA_MLP if forward is _llama_mlp_forward else _PHI3_MLP
    extra = sorted(set(dict(m.named_children())) - set(names))
    if extra:  # e.g. a dropout applied only in training, which an eval-mode probe cannot see
        return f"it holds modules the fused forward would not run: {extra}"
    if hooked(m):
        return "it has hooks"
    device, dtype = _device_dtype(m)
    if device is None or device.type == "meta":
        return "it has no parameters on a real device"
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(-8, 8, 97)
    with _probing(m):
        if not _agrees(act(t), F.silu(t)):
            return f"its activation {type(act).__name__} is not SiLU"
        first = m.gate_proj if forward is _llama_mlp_forward else m.gate_up_proj
        if not isinstance(getattr(first, "in_features", None), int):
            return f"its {type(first).__name__} projection has no in_features"
        x = torch.randn(2, first.in_features, generator=g).to(device, dtype)
        # large inputs too: a clamp of gate and up (a swiglu_limit) is invisible at randn's scale
        for scale in (1.0, 256.0):
            if not _agrees(m.forward(x * scale), forward(m, x * scale)):
                return "its forward is not down_proj(silu(gate) * up)"
    if not _agrees_in_training(m, lambda: m.forward(x), lambda: forward(m, x)):
        # a dropout applied in forward itself (Seed-OSS's residual dropout) shows no child module
        return "its forward in training is not down_proj(silu(gate) * up) (a dropout of its own?)"
    return None


def _agrees_in_training(m: nn.Module, theirs, ours) -> bool:
    """The two forwards in training mode, each from the same random state (the projections'
    own dropouts draw the same masks), torch's RNG restored after."""
    with _probing(m, training=True), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        a = theirs()
        torch.manual_seed(0)
        b = ours()
    return _agrees(a, b)


def fuse_layers(model: nn.Module, attention: bool = True, rope: bool = True) -> dict:
    """Install the fused RMSNorm and SwiGLU MLP on ``model`` (a transformers model, a PEFT
    model around one, or any module tree holding such layers), in place, (``attention``)
    switch its transformers models to the fused causal attention (hf_attention) and
    (``rope``) let their attention layers apply the fused rotary embedding (hf_rope).
    Returns a summary: ``{"rms_norm": count, "mlp": count, "attention": bool, "rope": count,
    "skipped": [(name, reason), ...]}``."""
    summary = {"rms_norm": 0, "mlp": 0, "attention": False, "rope": 0, "skipped": []}
    if attention:
        why = fuse_attention(model)
        summary["attention"] = why is None
        if why is not None and why != "no transformers model inside":
            summary["skipped"].append(("attention", why))
    if rope:
        summary["rope"], skipped = fuse_rope(model)
        summary["skipped"] += skipped
    for name, m in list(model.named_modules()):
        if type(m).__name__.endswith("RMSNorm") and type(m) is not RMSNorm:
            try:
                reason = norm_reason(m)
            except _PROBE_ERRORS as e:  # a module that cannot even run the probe is left alone
                reason = f"the probe failed: {type(e).__name__}: {e}"
            if reason is None:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                eps = norm_eps(m)
                setattr(parent, child, RMSNorm(m.weight.numel(), float(eps), m.weight))
                summary["rms_norm"] += 1
            else:
                summary["skipped"].append((name, reason))
            continue
        style = mlp_style(m)
        if style is None or getattr(m, _FLAG, False):
            continue
        try:
            reason = mlp_reason(m, style)
        except _PROBE_ERRORS as e:
            reason = f"the probe failed: {type(e).__name__}: {e}"
        if reason is None:
            # a partial, not a bound method: torch.save pickles it by the module-level
            # function (a MethodType would be looked up as an attribute of the class on load)
            m.forward = functools.partial(style[0], m)
            setattr(m, _FLAG, True)
            summary["mlp"] += 1
        else:
            summary["skipped"].append((name, reason))
    for name, reason in summary["skipped"]:
        log.info("qlora-kernels: %s not fused: %s", name, reason)
    return summary


def is_fused_mlp(m: nn.Module) -> bool:
    return bool(getattr(m, _FLAG, False))
