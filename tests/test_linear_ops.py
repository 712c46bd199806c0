"""torch.library contracts of the linear/LoRA ops: opcheck, torch.compile, bad input."""
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import nn as qnn

from .test_linear import make_weight


def _args4(K=70, N=33, M=5, r=4, bias=True, noise=False):
    packed, state, Wd = make_weight(N, K)
    x = torch.randn(M, K, requires_grad=True)
    A = torch.randn(r, K, requires_grad=True)
    B = torch.randn(N, r, requires_grad=True)
    b = torch.randn(N, requires_grad=True) if bias else None
    n = torch.empty(M, K).bernoulli_(0.8).div_(0.8) if noise else None
    return packed, state, Wd, x, A, B, b, n


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("noise", [False, True])
def test_opcheck_linear_and_lora_ops(path, bias, noise):
    packed, state, Wd, x, A, B, b, n = _args4(bias=bias, noise=noise)
    ops = torch.ops.qlora_kernels
    torch.library.opcheck(ops.linear_4bit.default, (x, packed, state.absmax, 64, "nf4", 33, b))
    torch.library.opcheck(ops.linear_4bit_grad_input.default,
                          (torch.randn(5, 33), packed, state.absmax, 64, "nf4", 70))
    torch.library.opcheck(ops.lora_linear_4bit.default, (x, packed, state.absmax, 64, "nf4", 33, A, B, 2.0, b, n))
    torch.library.opcheck(ops.lora_linear.default, (x, Wd, A, B, 2.0, b, n))
    for rows in (5, 9):  # the one-call composite and the many-row native path
        xr = torch.randn(rows, 70)
        ur = torch.randn(rows, 4)
        nr = None if n is None else torch.empty(rows, 70).bernoulli_(0.8).div_(0.8)
        torch.library.opcheck(ops.lora_linear_4bit_backward.default,
                              (torch.randn(rows, 33), xr, packed, state.absmax, 64, "nf4", A.detach(), B.detach(), 2.0,
                               nr, ur, True))


def _tiny_model():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    qk.quantize_model(base, skip=("2",))
    model = torch.nn.Sequential(
        qnn.LoraLinear(base[0], r=8, lora_alpha=16), torch.nn.GELU(), qnn.LoraLinear(base[2], r=4, lora_alpha=4))
    for m in model:
        if isinstance(m, qnn.LoraLinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    return model


def test_small_model_runs_under_torch_compile(path):
    model = _tiny_model()
    x = torch.randn(6, 48)
    eager = model(x)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5)
    assert set(grads) == {"0.lora_A", "0.lora_B", "0.base_layer.bias", "2.lora_A", "2.lora_B", "2.base_layer.bias"}


def test_bad_input_names_the_argument():
    packed, state, Wd, x, A, B, b, n = _args4()
    with pytest.raises(ValueError, match="x has 71 features but the 4-bit weight is"):
        qk.linear_4bit(torch.randn(2, 71), packed, state)
    with pytest.raises(ValueError, match="lora_A has shape"):
        qk.lora_linear_4bit(x, packed, state, torch.randn(4, 69), B, 1.0)
    with pytest.raises(ValueError, match="lora_B has shape"):
        qk.lora_linear_4bit(x, packed, state, A, torch.randn(33, 5), 1.0)
    with pytest.raises(ValueError, match="rank 0"):
        qk.lora_linear_4bit(x, packed, state, torch.randn(0, 70), torch.randn(33, 0), 1.0)
    with pytest.raises(TypeError, match="x must be float32"):
        qk.linear_4bit(torch.ones(2, 70, dtype=torch.int64), packed, state)
    with pytest.raises(TypeError, match="lora_A must be float32"):
        qk.lora_linear_4bit(x, packed, state, A.double(), B, 1.0)
    with pytest.raises(ValueError, match="bias has shape"):
        qk.lora_linear_4bit(x, packed, state, A, B, 1.0, bias=torch.randn(32))
    with pytest.raises(ValueError, match="dropout_p"):
        qk.lora_linear_4bit(x, packed, state, A, B, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(TypeError, match="scaling"):
        qk.lora_linear_4bit(x, packed, state, A, B, "2")
    other_packed, other_state, _ = make_weight(33, 64)  # a state from another weight
    with pytest.raises(ValueError, match="x has 70 features"):
        qk.linear_4bit(x, other_packed, other_state)
    with pytest.raises(ValueError, match="does not belong"):
        qk.linear_4bit(x, other_packed, state)
    with pytest.raises(ValueError, match=r"state.shape must be \[out_features, in_features\]"):
        p1, s1 = qk.quantize_4bit(torch.randn(70))
        qk.linear_4bit(x, p1, s1)
    with pytest.raises(ValueError, match="must be on the CPU"):
        qk.linear_4bit(x.detach().to("meta"), packed, state)
    with pytest.raises(ValueError, match="weight has shape"):
        qk.lora_linear(x, Wd.t(), A, B, 1.0)


@pytest.mark.parametrize("rows", [1, 9])
def test_empty_weights(path, rows):
    """A layer with no inputs ([N, 0]) gives its bias, one with no outputs ([0, K]) an empty
    result, on every path (the cpu backend once refused both over a row stride of 0)."""
    for N, K in ((8, 0), (0, 64)):
        packed, state = qk.quantize_4bit(torch.randn(N, K))
        x, b = torch.randn(rows, K), torch.randn(N)
        A, B = torch.randn(2, K), torch.randn(N, 2)
        for y in (qk.linear_4bit(x, packed, state, b), qk.lora_linear_4bit(x, packed, state, A, B, 1.0, bias=b)):
            assert torch.equal(y, b.expand(rows, N))


@pytest.mark.parametrize("rows", [5, 9])  # the one-call composite and the many-row native path
def test_lora_backward_op_checks_u(path, rows):
    """The backward op's u (the forward's x @ lora_A.T) is read by the native kernel as dense
    fp32 rows: another shape or dtype is refused by name; an expanded or transposed view of the
    right shape gives the values of a dense copy (it once read past the tensor)."""
    packed, state, _, _, A, B, _, _ = _args4()
    A, B = A.detach(), B.detach()
    op = torch.ops.qlora_kernels.lora_linear_4bit_backward
    x, dy = torch.randn(rows, 70), torch.randn(rows, 33)

    def call(u):
        return op(dy, x, packed, state.absmax, 64, "nf4", A, B, 2.0, None, u, True)

    with pytest.raises(TypeError, match="u must be float32"):
        call(torch.randn(rows, 4).bfloat16())
    with pytest.raises(ValueError, match=rf"u has shape \(4, {rows}\).*must be \[{rows}, 4\]"):
        call(torch.randn(4, rows))
    for u in (torch.randn(1, 4).expand(rows, 4), torch.randn(4, rows).t()):
        for got, want in zip(call(u), call(u.contiguous())):
            assert torch.equal(got, want)


def test_inference_calls_skip_the_dispatcher_and_agree():
    """Calls that need no autograd run the op's implementation directly (no dispatcher
    overhead); anything that needs the dispatcher (autograd, fake tensors) still gets it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed, state, _ = make_weight(33, 70)
    x = torch.randn(5, 70)

    def ops_seen(fn):
        with torch.profiler.profile() as prof:
            out = fn()
        return out, {e.name for e in prof.events()}

    y_direct, seen = ops_seen(lambda: qk.linear_4bit(x, packed, state))
    assert "qlora_kernels::linear_4bit" not in seen
    xg = x.clone().requires_grad_()
    y_op, seen = ops_seen(lambda: qk.linear_4bit(xg, packed, state))
    assert "qlora_kernels::linear_4bit" in seen
    assert torch.equal(y_direct, y_op.detach())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # state.absmax stays real
        fake = qk.linear_4bit(mode.from_tensor(x), mode.from_tensor(packed), state)
    assert fake.shape == (5, 33)


def test_lora_backward_op_checks_dy_and_every_op_checks_its_rows_and_scaling():
    # called through torch.ops (past functional's checks): a meta dy among CPU tensors went to
    # the fake kernel and came back as uninitialized memory; a 0-d x raised a bare IndexError;
    # a NaN scaling gave all-NaN outputs
    ops = torch.ops.qlora_kernels
    packed, state = qk.quantize_4bit(torch.randn(8, 64))
    x, A, B = torch.randn(3, 64), torch.randn(2, 64), torch.randn(8, 2)
    y, u = ops.lora_linear_4bit(x, packed, state.absmax, 64, "nf4", 8, A, B, 0.5, None, None)
    args = (x, packed, state.absmax, 64, "nf4", A, B, 0.5, None, u, True)
    with pytest.raises(ValueError, match="dy is on meta but x is on cpu"):
        ops.lora_linear_4bit_backward(torch.ones(3, 8, device="meta"), *args)
    with pytest.raises(TypeError, match="dy must be float32, bfloat16 or float16"):
        ops.lora_linear_4bit_backward(torch.ones(3, 8, dtype=torch.float64), *args)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 8\); x has \(3, 64\)"):
        ops.lora_linear_4bit_backward(torch.ones(4, 8), *args)
    with pytest.raises(ValueError, match="dy must have at least one dimension"):
        ops.lora_linear_4bit_backward(torch.tensor(1.0), *args)
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        ops.linear_4bit(torch.tensor(1.0), packed, state.absmax, 64, "nf4", 8, None)
    with pytest.raises(ValueError, match="dy must have at least one dimension"):
        ops.linear_4bit_grad_input(torch.tensor(1.0), packed, state.absmax, 64, "nf4", 64)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scaling must be finite"):
            ops.lora_linear_4bit(x, packed, state.absmax, 64, "nf4", 8, A, B, bad, None, None)
        with pytest.raises(ValueError, match="scaling must be finite"):
            ops.lora_linear(x, torch.randn(8, 64), A, B, bad, None, None)


@pytest.mark.parametrize("shape", [(3, 70), (9, 70), (2, 9, 70)])
def test_op_outputs_take_in_place_updates(path, shape):
    """The many-row LoRA path returned a view of its buffer, which autograd refuses to update
    in place ("Output 0 of qlora_kernels::lora_linear_4bit is a view"): Llama 4's shared
    expert adds to its projection's output in place. Every linear/LoRA op's output takes it."""
    packed, state, Wd, _, A, B, b, _ = _args4()
    x = torch.randn(*shape, requires_grad=True)
    for f in (lambda: qk.lora_linear_4bit(x, packed, state, A, B, 0.5, b, 0.1, True),
              lambda: qk.lora_linear_4bit(x, packed, state, A, B, 0.5, b),
              lambda: qk.linear_4bit(x, packed, state, b),
              lambda: qk.lora_linear(x, Wd.t().contiguous().t(), A, B, 0.5, b, 0.1, True)):
        y = f()
        y.add_(1.0)
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        x.grad = None
