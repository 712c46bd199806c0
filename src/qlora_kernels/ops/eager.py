"""The ops' autograd in plain eager calls, without the dispatcher.

A ``torch.library`` custom op with ``register_autograd`` costs ~130 µs more per forward +
backward than the same implementation under a ``torch.autograd.Function`` (~260 against
~130 µs at a small LoRA layer: the dispatcher twice each way, the custom-op autograd
wrapper filling defaults and re-dispatching): at a SmolLM2 training step's ~360 calls (210
LoRA layers, 61 norms, 30 each of SwiGLU, attention and RoPE) that is 40-50 ms of a 2 s
step (docs/benchmarks.md). So each op with a backward also has an ``autograd.Function``
built from the very pieces registered with the op (its implementation, ``setup_context``
and ``backward``), which the functional layer takes where :func:`ok` holds: not compiling
or tracing, no torch function / dispatch mode, no functorch transform or forward-mode AD,
plain CPU tensors. Everything else (torch.compile, fake tensors, DTensor, vmap) still goes
through the op. FSDP and DeepSpeed in eager mode hand the layers plain gathered parameters
(hooks, not modes), so their calls take the Function. The backward then calls the backward
op's implementation directly too (:func:`backward_op`), except where the backward itself is
recorded (``create_graph``) or compiled (compiled autograd): there it calls the op, so a
double backward fails as it does on the op path. Same code, same bits: the tests run both
paths against each other.

The Function classes carry the op's name (``qlora_kernels::rope``), which is what
``torch.profiler`` records for them, and a direct backward call is recorded under its op's
name while the profiler runs, so a profile reads the same on either path."""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_EAGER = "_qlora_kernels_eager"  # set on the ctx of a forward run by one of these Functions


def ok(*args) -> bool:
    """Whether an op called with ``args`` may run as its eager Function."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._get_tracing_state() is not None
            or torch._C._functorch.peek_interpreter_stack() is not None
            # a Function without a jvp raises under forward-mode AD; the op gives no tangent
            or forward_ad._current_level >= 0):
        return False
    for a in args:
        # nn.Parameter is a plain tensor to the dispatcher (its __torch_function__ is
        # torch's disabled default); subclasses (DTensor, fake and functional tensors) are not
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TYPES or not a.is_cpu):
            return False
    return True


def function(name: str, op, impl, setup_context, backward):
    """``op`` (the custom op ``name``, registered with ``setup_context`` and ``backward``) as a
    callable that runs an ``autograd.Function`` equivalent of it, on ``impl`` (the op's
    implementation), where :func:`ok` holds, and the op itself elsewhere."""

    def forward(ctx, *inputs):
        out = impl(*inputs)
        setattr(ctx, _EAGER, True)
        setup_context(ctx, inputs, out)
        return out

    fn = type(name, (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(backward), "__module__": __name__})

    def call(*args):
        return fn.apply(*args) if ok(*args) else op(*args)

    return call


def backward_op(ctx, op, impl):
    """What a registered backward calls: the backward op's implementation when the forward
    ran as its eager Function, the op otherwise. Also the op where the backward is recorded
    (``create_graph``: the backward ops have no autograd, so a double backward raises on
    both paths instead of silently dropping the second-order term) or traced (compiled
    autograd)."""
    if not getattr(ctx, _EAGER, False) or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op
    if torch._C._autograd._profiler_enabled():
        return _recorded(impl)
    return impl


def _recorded(impl):
    # every op's implementation is named <op>_impl
    name = "qlora_kernels::" + impl.__name__.removesuffix("_impl")

    def run(*args):
        with torch.profiler.record_function(name):
            return impl(*args)

    return run
