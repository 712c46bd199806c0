"""The fused output head + cross-entropy (qlora_kernels.linear_cross_entropy) inside a
Hugging Face causal LM, so that ``model(input_ids, labels=...).loss.backward()`` -- what the
Trainer, TRL and PEFT training loops run -- never materializes the [tokens, vocab] logits.

``fuse_loss(model)`` gives one model instance its own ``forward``: in training (module in
train mode, autograd on, ``labels`` given, the output head a plain ``nn.Linear``) it runs the
class's forward with the head made an identity and transformers' ``loss_function`` replaced
by the fused loss on the hidden states, with transformers' label shift, ``ignore_index``
and ``num_items_in_batch`` rules; the output carries the loss and ``logits=None`` (as
Liger-Kernel does in training: the logits are exactly what is not computed). Anything else
(evaluation, generation, no labels, a LoRA or ``modules_to_save`` wrapper on the head, a
model whose head is followed by soft-capping or scaling) runs the original forward
untouched. Other instances of the class are not affected."""
from __future__ import annotations

import contextlib
import inspect
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import linear_cross_entropy

log = logging.getLogger(__name__)

# Config fields of architectures whose logits are transformed after the head (Gemma 2/3
# soft-capping, Cohere/Granite scaling): the fused loss would skip that step.
_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_FLAG = "_qlora_kernels_fused_loss"


def _causal_lm(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):  # DDP forwards to .module
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``fuse_loss`` would leave this model alone (None: it can fuse)."""
    m = _causal_lm(model)
    if not hasattr(m, "get_output_embeddings") or not hasattr(m, "config"):
        return f"{type(m).__name__} is not a transformers model"
    params = inspect.signature(type(m).forward).parameters
    if "labels" not in params or "logits_to_keep" not in params:
        return f"{type(m).__name__}.forward is not a causal-LM forward (labels, logits_to_keep)"
    # the text model's config too: vision-language models (Gemma 3n/4, PaliGemma 2) keep the
    # soft-capping there; and the module itself (some set it as an attribute or a submodule)
    configs = [m.config]
    get_text = getattr(m.config, "get_text_config", None)
    if callable(get_text):
        text = get_text(decoder=True)
        if text is not None and text is not m.config:
            configs.append(text)
    for attr in (*_POST_HEAD, "logit_softcap"):
        for where, v in [(f"config.{attr}", getattr(c, attr, None)) for c in configs] + [(attr, getattr(m, attr, None))]:
            if v is not None and not (isinstance(v, (int, float)) and v == 1):
                return f"{type(m).__name__} transforms its logits after the head ({where}={v!r})"
    head = m.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"its output head is a {type(head).__name__}, not an nn.Linear"
    for c in configs:
        unpadded = getattr(c, "unpadded_vocab_size", None)
        if isinstance(unpadded, int) and unpadded < head.out_features:
            # the logits are cut to the unpadded vocabulary after the head (Inkling)
            return (f"{type(m).__name__} cuts its logits to unpadded_vocab_size={unpadded} of the head's "
                    f"{head.out_features}")
    return None


def fuse_loss(model: nn.Module) -> bool:
    """Install the fused head + loss on ``model`` (a transformers ``*ForCausalLM`` or a PEFT
    model around one); returns whether it was installed (the reason is logged if not)."""
    reason = unsupported_reason(model)
    m = _causal_lm(model)
    if reason is not None:
        log.info("qlora-kernels: fused loss not installed: %s", reason)
        return False
    m.forward = FusedLossForward(m)
    setattr(m, _FLAG, True)
    return True


class FusedLossForward:
    """The instance forward fuse_loss installs. A module-level class, not a bound closure:
    torch.save pickles it with the model (a bound closure came back as the class's own
    forward, the fused loss silently gone while is_fused() said True). The class's
    signature stays visible: the Trainer drops dataset columns the forward does not name."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return _fused_forward(self.module, *args, **kwargs)

    @property
    def __self__(self):  # as a bound method's (copies and code that unwraps forwards look at it)
        return self.module

    @property
    def __signature__(self):
        return inspect.signature(types.MethodType(type(self.module).forward, self.module))


def unfuse_loss(model: nn.Module) -> None:
    m = _causal_lm(model)
    m.__dict__.pop("forward", None)
    m.__dict__.pop(_FLAG, None)


def is_fused(model: nn.Module) -> bool:
    return bool(getattr(_causal_lm(model), _FLAG, False))


@contextlib.contextmanager
def _instance_attr(obj, name: str, value):
    missing = object()
    old = obj.__dict__.get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = old


def _fused_forward(self, *args, **kwargs):
    original = type(self).forward
    head = self.get_output_embeddings()
    # logits_to_keep as a tensor of positions: which labels they score is transformers' to
    # say (it raises on a mismatch); the loss below keeps the last positions only
    if (kwargs.get("labels") is None or not self.training or not torch.is_grad_enabled()
            or type(head) is not nn.Linear or kwargs.get("return_dict") is False
            or isinstance(kwargs.get("logits_to_keep"), torch.Tensor)):
        return original(self, *args, **kwargs)

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **_):
        hidden = logits  # the head was an identity: these are the final hidden states
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        if shift_labels.shape[-1] != hidden.shape[-2]:  # logits_to_keep cut the positions
            shift_labels = shift_labels[..., -hidden.shape[-2]:]
        return linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), bias=head.bias,
                                    ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)

    with _instance_attr(head, "forward", lambda h: h), _instance_attr(self, "_loss_function", loss_function):
        out = original(self, *args, **kwargs)
    # a fresh output without the hidden states that came out of the skipped head
    return type(out)(**{k: v for k, v in out.items() if k != "logits"})
