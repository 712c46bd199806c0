"""The ops' eager autograd Functions (ops/eager.py): plain eager training calls skip the
dispatcher, with the op's own implementation, setup and backward, so the two paths must give
the same bits, forward and every gradient; anything that needs the dispatcher (modes,
tensor subclasses, torch.compile, functorch) still takes the op."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import qlora_kernels as qk
from qlora_kernels.ops import eager

from .conftest import on_path


def _w(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return qk.quantize_4bit(torch.randn(N, K, generator=g) * 0.05, "nf4", 64, True)


def _leaf(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_()


def _case(name):
    """(leaf tensors, fn(*leaves) -> output tensors) of one op at an awkward shape."""
    if name in ("linear_4bit", "linear_4bit_int8"):
        packed, state = _w(33, 70)
        compute = "int8" if name.endswith("int8") else "fp32"
        return [_leaf(2, 7, 70, seed=1), _leaf(33, seed=2)], \
            lambda x, b: (qk.linear_4bit(x, packed, state, b, compute=compute),)
    if name in ("lora_linear_4bit", "lora_linear_4bit_dropout"):
        packed, state = _w(129, 130)
        p = 0.25 if name.endswith("dropout") else 0.0

        def f(x, A, B, b):
            torch.manual_seed(5)  # the same dropout mask on both paths
            return (qk.lora_linear_4bit(x, packed, state, A, B, 0.5, b, dropout_p=p, training=True),)

        return [_leaf(3, 5, 130, seed=1), _leaf(4, 130, seed=2), _leaf(129, 4, seed=3), _leaf(129, seed=4)], f
    if name == "lora_linear":
        return [_leaf(9, 65, seed=1), _leaf(17, 65, seed=2), _leaf(3, 65, seed=3), _leaf(17, 3, seed=4),
                _leaf(17, seed=5)], lambda x, W, A, B, b: (qk.lora_linear(x, W, A, B, 2.0, b),)
    if name == "linear_cross_entropy":
        labels = torch.tensor([3, -100, 0, 40, 7, 7, 1])

        def f(x, W, b):
            return (qk.linear_cross_entropy(x, W, labels, b),)

        return [_leaf(7, 33, seed=1), _leaf(41, 33, seed=2), _leaf(41, seed=3)], f
    if name == "rms_norm":
        return [_leaf(4, 7, 130, seed=1), _leaf(130, seed=2)], lambda x, w: (qk.rms_norm(x, w, 1e-5),)
    if name == "swiglu":
        return [_leaf(5, 97, seed=1), _leaf(5, 97, seed=2)], lambda g, u: (qk.swiglu(g, u),)
    if name == "causal_attention":
        lengths = torch.tensor([7, 4])
        return [_leaf(2, 4, 7, 16, seed=1), _leaf(2, 2, 7, 16, seed=2), _leaf(2, 2, 7, 16, seed=3)], \
            lambda q, k, v: (qk.causal_attention(q, k, v, key_lengths=lengths),)
    if name == "rope":
        g = torch.Generator().manual_seed(3)
        cos, sin = torch.randn(1, 9, 14, generator=g), torch.randn(1, 9, 14, generator=g)
        return [_leaf(2, 3, 9, 14, seed=1), _leaf(2, 1, 9, 14, seed=2)], lambda q, k: qk.rope(q, k, cos, sin)
    raise AssertionError(name)


OPS = ["linear_4bit", "linear_4bit_int8", "lora_linear_4bit", "lora_linear_4bit_dropout", "lora_linear",
       "linear_cross_entropy", "rms_norm", "swiglu", "causal_attention", "rope"]


def _op_name(case: str) -> str:
    return "lora_linear_4bit" if case == "lora_linear_4bit_dropout" else case


def _op_node(t: torch.Tensor) -> str:
    """The name of the op's node under t (through the views and the mean division the
    functional layer adds)."""
    node = t.grad_fn
    while node is not None and not ("qlora_kernels" in node.name()):
        node = node.next_functions[0][0]
    return "" if node is None else node.name()


def _run(case, monkeypatch, use_eager: bool, frozen=()):
    """(outputs, gradients of the leaves that require one) on one path; ``frozen``: indices of
    leaves that do not require a gradient (a frozen input, a bias that does not train)."""
    leaves, fn = _case(case)
    for i in frozen:
        leaves[i].requires_grad_(False)
    with monkeypatch.context() as m:
        if not use_eager:
            m.setattr(eager, "ok", lambda *args: False)
        outs = fn(*leaves)
        g = torch.Generator().manual_seed(9)
        grads = torch.autograd.grad(outs, [t for t in leaves if t.requires_grad],
                                    [torch.randn(o.shape, generator=g) for o in outs])
    return outs, grads


@pytest.mark.parametrize("frozen", ["none", "first", "last"])
@pytest.mark.parametrize("case", OPS)
def test_eager_function_gives_the_ops_bits(path, case, frozen, monkeypatch):
    """On every CPU path (and the reference backend): outputs and every input's gradient
    equal bit for bit, and each call took the path it says it took; also with the first
    input (x, q, gate) or the last (bias, v, k) frozen, so the needs_input_grad branches run."""
    n = len(_case(case)[0])
    idx = {"none": (), "first": (0,), "last": (n - 1,)}[frozen]
    with on_path(*path):
        (oe, ge), (oo, go) = _run(case, monkeypatch, True, idx), _run(case, monkeypatch, False, idx)
    name = _op_name(case)
    for e, o in zip(oe, oo):
        assert _op_node(e) == f"qlora_kernels::{name}Backward"
        assert f"qlora_kernels_{name}" in _op_node(o)
        assert torch.equal(e, o)
    assert len(ge) == len(go) == n - len(idx)
    for i, (e, o) in enumerate(zip(ge, go)):
        assert torch.equal(e, o), f"{case}: gradient of input {i}"


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_layers_give_the_ops_bits(reentrant, monkeypatch):
    """Activation checkpointing (transformers' gradient_checkpointing) re-runs the forward in
    the backward: both paths still give the same gradients."""
    packed, state = _w(33, 70)
    leaves = [_leaf(5, 70, seed=1), _leaf(4, 70, seed=2), _leaf(33, 4, seed=3), _leaf(70, seed=4)]

    def block(x, A, B, w):
        return qk.rms_norm(qk.lora_linear_4bit(qk.rms_norm(x, w), packed, state, A, B, 2.0), torch.ones(33))

    grads = []
    for use_eager in (True, False):
        with monkeypatch.context() as m:
            if not use_eager:
                m.setattr(eager, "ok", lambda *args: False)
            for t in leaves:
                t.grad = None
            y = torch.utils.checkpoint.checkpoint(block, *leaves, use_reentrant=reentrant)
            y.square().sum().backward()  # (reentrant checkpointing refuses autograd.grad)
            grads.append([t.grad for t in leaves])
    for e, o in zip(*grads):
        assert torch.equal(e, o)


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _FunctionPassthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def test_the_op_where_the_dispatcher_is_needed():
    """A dispatch mode (FakeTensor's, FSDP's), a torch function mode, a tensor subclass
    (DTensor), a functorch transform: the op, not the Function."""
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    assert eager.ok(x, w, 1e-5) and qk.rms_norm(x, w).grad_fn.name() == "qlora_kernels::rms_normBackward"
    for mode in (_Passthrough(), _FunctionPassthrough()):
        with mode:
            assert not eager.ok(x, w)
            assert "qlora_kernels_rms_norm" in qk.rms_norm(x, w).grad_fn.name()
    assert not eager.ok(x.as_subclass(_Sub), w)
    assert not eager.ok(x.to("meta"), w)
    seen = []  # (the op has no functorch rule either: only the choice is checked)
    torch.func.grad(lambda t: (seen.append(eager.ok(t)), t.sum())[1])(x.detach())
    assert seen == [False]


def test_compiled_calls_take_the_op():
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    seen = []

    def f(x, w):
        seen.append(eager.ok(x, w))
        return qk.rms_norm(x, w)

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    y.sum().backward()
    assert seen == [False]
    torch.testing.assert_close(x.grad, torch.autograd.grad(qk.rms_norm(x, w).sum(), x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("use_eager", [True, False])
def test_second_order_gradients_are_refused_on_both_paths(use_eager, monkeypatch):
    """A gradient penalty (create_graph, then a backward through the gradient): the backward
    ops have no autograd, so it must raise on both paths, never drop the term silently."""
    leaves, fn = _case("rms_norm")
    with monkeypatch.context() as m:
        if not use_eager:
            m.setattr(eager, "ok", lambda *args: False)
        (y,) = fn(*leaves)
        gx, _ = torch.autograd.grad(y.sum(), leaves, create_graph=True)
        assert gx.requires_grad
        with pytest.raises(RuntimeError, match="rms_norm_backward"):
            (gx.pow(2).sum() + leaves[0].pow(2).sum()).backward()


def test_compiled_autograd_calls_the_backward_op():
    """A backward traced by compiled autograd must see the op, not the native call."""
    leaves, fn = _case("rms_norm")
    (y,) = fn(*leaves)
    seen = []
    real = eager.backward_op

    def spy(ctx, op, impl):
        got = real(ctx, op, impl)
        seen.append(got is op)
        return got

    from torch._dynamo import compiled_autograd

    eager.backward_op = spy
    try:
        with compiled_autograd._enable(torch.compile(backend="eager")):
            y.sum().backward()
    finally:
        eager.backward_op = real
    assert seen == [True]


def test_profiles_name_the_op_on_both_paths(monkeypatch):
    """The forward and the backward op are recorded under the ops' names on either path."""
    leaves, fn = _case("rope")
    for use_eager in (True, False):
        with monkeypatch.context() as m:
            if not use_eager:
                m.setattr(eager, "ok", lambda *args: False)
            with torch.profiler.profile() as prof:
                outs = fn(*leaves)
                torch.autograd.grad([o.sum() for o in outs], leaves)
        names = {e.name for e in prof.events()}
        assert {"qlora_kernels::rope", "qlora_kernels::rope_backward"} <= names, use_eager


def test_forward_mode_ad_takes_the_op():
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(3, 8)
    assert eager.ok(x)
    with fwAD.dual_level():
        assert not eager.ok(fwAD.make_dual(x, torch.ones_like(x)))
