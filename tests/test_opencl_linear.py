"""The fused linear and LoRA ops on the opencl backend, in both kernel styles, held to
the reference with the tolerances of the CPU tests: the CPU suites' own test functions
run here with `path` selecting opencl + a style (test_linear's forward test restated with
the rounding of the bias add in its bound), then every kernel path, the OpenCL LoRA
kernels (device-side adapter, FPGA-style fused forward) against the reference
backend's torch definitions, and the DoRA norm."""
import math

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import opencl as ocl
from qlora_kernels.backends.reference import lora_backward, lora_forward_tail

from . import test_linear, test_lora
from .test_linear import EPS32, assert_within, dot_bound, make_weight


@pytest.fixture(params=["ndrange", "fpga"])
def path(request):
    reason = qk.unavailable_reason("opencl")
    assert reason is None, f"the opencl backend must run here (CI installs PoCL): {reason}"
    torch.manual_seed(0)  # the borrowed tests draw from the global generator
    with qk.use_backend("opencl"), ocl.use_style(request.param):
        yield ("opencl", request.param)


# The CPU suites, verbatim, on this module's `path`.
test_half_precision_activations = test_linear.test_half_precision_activations
test_lora_matches_reference = test_lora.test_lora_matches_reference
test_dropout_mask_is_torchs_and_reproducible = test_lora.test_dropout_mask_is_torchs_and_reproducible
test_lora_half_precision = test_lora.test_lora_half_precision
test_frozen_x_gives_no_input_grad = test_lora.test_frozen_x_gives_no_input_grad


test_forward_and_input_grad_match_reference = test_linear.test_forward_and_input_grad_match_reference


ROWS = {"ndrange": (1, 2, 3, 5, 8, 9, 64), "fpga": (1, 3, 9)}


@pytest.mark.parametrize("K,N,bs", [(1024, 1024, 64), (1024, 40, 32), (1024, 40, 256), (4097, 7, 64), (96, 4097, 64),
                                    (48, 33, 64)])
def test_every_kernel_path(path, K, N, bs):
    """Each GEMV row count and x order (K % 128, K % 32, K % 16, odd K; blocks smaller and
    larger than 128), the GEMM tiles, and the FPGA wide-burst and per-element paths."""
    packed, state, Wd = make_weight(N, K, "nf4", bs, False, seed=N)
    for m in ROWS[path[1]]:
        x = torch.randn(m, K)
        assert_within(qk.linear_4bit(x, packed, state), x @ Wd.t(), dot_bound(x, Wd), f"M={m}")
        dy = torch.randn(m, N)
        dx = torch.ops.qlora_kernels.linear_4bit_grad_input(dy, packed, state.absmax, bs, "nf4", K)
        assert_within(dx, dy @ Wd, dot_bound(dy, Wd.t()), f"grad M={m}")


LORA = [  # (M, K, N, r)
    (1, 64, 40, 1), (7, 70, 33, 8), (3, 4097, 9, 16), (96, 65, 130, 64), (5, 33, 4097, 4), (9, 24, 20, 70),
]


def _lora_inputs(M, K, N, r, dropout):
    g = torch.Generator().manual_seed(M * K + r)
    packed, state, Wd = make_weight(N, K, "fp4" if r % 2 else "nf4", 64, False, seed=r)
    x = torch.randn(M, K, generator=g)
    A = torch.randn(r, K, generator=g) / math.sqrt(K)
    B = torch.randn(N, r, generator=g) / math.sqrt(r)
    bias = torch.randn(N, generator=g)
    noise = (torch.rand(M, K, generator=g) > dropout).float() / (1 - dropout) if dropout else None
    return packed, state, Wd, x, A, B, bias, noise


def _forward_tol(x, Wd, A, B, scaling, noise):
    """test_lora's bound: the worst case of any fp32 order over K + r terms, doubled."""
    xd = x if noise is None else x * noise
    mag = x.abs() @ Wd.abs().t() + scaling * (xd.abs() @ A.abs().t()) @ B.abs().t()
    return (x.shape[1] + A.shape[0] + 4) * EPS32 * mag * 2


def _close(got, want, what):
    scale = want.abs().max().item() + 1e-12
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max error {err:.3g} vs magnitude {scale:.3g}"


@pytest.mark.parametrize("M,K,N,r", LORA, ids=[f"{M}x{K}->{N}r{r}" for M, K, N, r in LORA])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_device_side_adapter_matches_the_op_definition(path, M, K, N, r, dropout):
    from qlora_kernels.backends import opencl as backend

    packed, state, Wd, x, A, B, bias, noise = _lora_inputs(M, K, N, r, dropout)
    scaling = 16 / math.sqrt(r)
    y_ref = x @ Wd.t() + bias
    u_ref = lora_forward_tail(x, y_ref, A, B, scaling, noise)
    tol = _forward_tol(x, Wd, A, B, scaling, noise)
    # fused forward: one FPGA-style kernel with u on chip (r <= 64), or NDRange kernels
    y, u = backend.lora_linear_4bit(x, packed, state.absmax, 64, state.quant_type, N, A, B, scaling, bias, noise)
    assert_within(y, y_ref, tol, "fused forward y")
    xd = x if noise is None else x * noise
    assert_within(u, u_ref, dot_bound(xd, A) * 2, "fused forward u")
    y2 = x @ Wd.t() + bias
    u2 = backend.lora_forward_tail(x, y2, A, B, scaling, noise)
    assert_within(y2, y_ref, tol, "forward tail y")
    assert_within(u2, u_ref, dot_bound(xd, A) * 2, "forward tail u")
    dy = torch.randn(M, N)
    want = lora_backward(dy, x, u_ref, A, B, scaling, noise, True)
    got = backend.lora_backward(dy, x, u_ref, A, B, scaling, noise, True)
    for name, g, w in zip(("dA", "dB", "dx_lora"), got, want):
        _close(g, w, name)
    assert backend.lora_backward(dy, x, u_ref, A, B, scaling, noise, False)[2] is None


def test_lora_module_gradients_match_the_cpu_backend(path):
    torch.manual_seed(0)
    layer = qk.nn.LoraLinear(qk.nn.Linear4bit(4097, 33, double_quant=True), r=8, lora_alpha=16)
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    x = torch.randn(2, 3, 4097, requires_grad=True)
    dy = torch.randn(2, 3, 33)
    grads = []
    for backend in ("cpu", "opencl"):
        with qk.use_backend(backend):
            x.grad = None
            layer.zero_grad()
            y = layer(x)
            y.backward(dy)
            grads.append((y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for name, g, w in zip(("y", "dx", "dA", "dB"), grads[1], grads[0]):
        _close(g, w, name)


@pytest.mark.parametrize("N,K,r", [(1, 7, 1), (33, 4097, 8), (4097, 64, 16), (40, 96, 70)])
def test_dora_weight_norm_from_the_4bit_weight(N, K, r):
    from qlora_kernels.backends import opencl as backend

    packed, state, Wd = make_weight(N, K, "nf4", 64, True, seed=N + K)
    g = torch.Generator().manual_seed(r)
    A, B = torch.randn(r, K, generator=g) / math.sqrt(K), torch.randn(N, r, generator=g) * 0.05
    want = torch.linalg.norm((Wd.double() + 2.0 * B.double() @ A.double()), dim=1)
    got = backend.dora_weight_norm(packed, qk.functional.absmax_fp32(state), 64, "nf4", N, K, A, B, 2.0)
    # each entry carries r + 2 roundings, the sum of K squares K more
    mag = torch.linalg.norm(Wd.double().abs() + 2.0 * B.double().abs() @ A.double().abs(), dim=1)
    assert_within(got, want, mag * (K + r + 4) * EPS32, "DoRA norm")


def test_adapter_layers_run_the_opencl_kernels(path, monkeypatch):
    """With the backend selected, a LoRA layer's forward and backward and a DoRA layer's
    weight norm run the OpenCL adapter kernels, not the reference fallbacks."""
    from qlora_kernels import backends

    calls = []
    for op in ("lora_linear_4bit", "lora_backward", "lora_forward_tail", "dora_weight_norm", "linear_4bit_grad_input"):
        backend, kernel = backends.kernel_for(op)
        assert backend == "opencl", op

        def spy(*args, _op=op, _kernel=kernel):
            calls.append(_op)
            return _kernel(*args)

        monkeypatch.setitem(backends._KERNELS[op], "opencl", spy)
    torch.manual_seed(0)
    layer = qk.nn.LoraLinear(qk.nn.Linear4bit(70, 33), r=4, lora_alpha=8)
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    x = torch.randn(5, 70, requires_grad=True)
    layer(x).sum().backward()
    assert calls == ["lora_linear_4bit", "lora_backward", "linear_4bit_grad_input"]
    dense = qk.nn.LoraLinear(torch.nn.Linear(70, 33), r=4, lora_alpha=8)
    dense(x).sum().backward()
    assert calls[3:] == ["lora_forward_tail", "lora_backward"]
    from qlora_kernels import dora

    base = qk.nn.Linear4bit(70, 33)
    norm = dora.weight_norm(base, torch.randn(4, 70), torch.randn(33, 4), 2.0)
    assert calls[5:] == ["dora_weight_norm"] and norm.shape == (33,)
