"""Calls that once failed on some backends only (found by a read-only review): each runs on
every backend this machine has (CI installs PoCL, so the opencl backend is one of them)."""
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import dora
from qlora_kernels.ops import linear as L

BACKENDS = ("reference", "cpu", "opencl", "hls")


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = qk.unavailable_reason(request.param)
    assert reason is None, f"the {request.param} backend must run here: {reason}"
    torch.manual_seed(0)
    with qk.use_backend(request.param):
        yield request.param


def test_a_weight_quantized_under_inference_mode(backend):
    """Inference tensors have no version counter: a weight made under torch.inference_mode
    (a serving process's habit) failed every backend's staleness check."""
    with torch.inference_mode():
        packed, state = qk.quantize_4bit(torch.randn(32, 64), double_quant=True)
    x = torch.randn(3, 64)
    with qk.use_backend("reference"):
        want = qk.linear_4bit(x, packed, state)
    torch.testing.assert_close(qk.linear_4bit(x, packed, state), want, rtol=1e-5, atol=1e-5)


def test_a_layer_first_run_under_inference_mode_then_trains(backend):
    """What a layer derives on its first call (the decoded absmax, the device copy) is kept
    for later calls: made under inference_mode it was an inference tensor, which autograd
    refused to save once training went on."""
    m = qk.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 32)), double_quant=True)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        before = m(x)
    xg = x.clone().requires_grad_(True)
    y = m(xg)
    y.sum().backward()
    assert torch.equal(y.detach(), before) and xg.grad is not None and xg.grad.abs().sum() > 0


def test_dora_norm_of_a_strided_lora_a(backend):
    """A transposed lora_A went to the native kernels as if its rows were dense."""
    m = qk.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False)))
    A, B = torch.randn(64, 4).t(), torch.randn(48, 4)
    with qk.use_backend("reference"):
        want = dora.weight_norm(m[0], A.contiguous(), B, 2.0)
    torch.testing.assert_close(dora.weight_norm(m[0], A, B, 2.0), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("N, K", [(0, 4), (3, 0)])
def test_lora_u_of_an_empty_layer(backend, N, K):
    """u = x A^T is the forward's second output even when the layer has no outputs; the
    opencl backend returned zeros for N = 0."""
    x, A, B = torch.randn(2, K), torch.randn(2, K), torch.randn(N, 2)
    packed, state = qk.quantize_4bit(torch.randn(N, K))
    want = x @ A.t()
    _, u = L.lora_linear_impl(x, torch.randn(N, K), A, B, 0.5, None, None)
    torch.testing.assert_close(u, want)
    _, u4 = L.lora_linear_4bit_impl(x, packed, state.absmax, state.blocksize, state.quant_type, N, A, B, 0.5, None,
                                    None)
    torch.testing.assert_close(u4, want)
