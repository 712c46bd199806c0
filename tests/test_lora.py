"""Fused LoRA / QLoRA ops: outputs and all gradients against plain torch (the reference
definition, which is what PEFT computes), dropout masks included."""
import math

import pytest
import torch
import torch.nn.functional as F

import qlora_kernels as qk

from .test_linear import EPS32, assert_within, make_weight


def reference(x, Wd, A, B, scaling, bias, p, training, seed):
    torch.manual_seed(seed)
    xd = F.dropout(x, p, training) if p > 0 else x
    y = F.linear(x, Wd, bias) + scaling * (xd @ A.t()) @ B.t()
    return y


def _leaf(t, dtype=None):
    t = t.detach().clone()
    return (t.to(dtype) if dtype else t).requires_grad_()


CASES = [  # (leading, K, N, r)
    ((1,), 64, 40, 1), ((7,), 70, 33, 8), ((512,), 96, 48, 16), ((2, 5), 65, 130, 64), ((4096,), 24, 20, 8),
]


@pytest.mark.parametrize("lead,K,N,r", CASES, ids=[f"{l}x{K}->{N}r{r}" for l, K, N, r in CASES])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("base", ["4bit", "dense"])
def test_lora_matches_reference(path, lead, K, N, r, dropout, bias, base):
    packed, state, Wd = make_weight(N, K, seed=r)
    g = torch.Generator().manual_seed(K + N + r)
    x0 = torch.randn(*lead, K, generator=g)
    A0 = torch.randn(r, K, generator=g) / math.sqrt(K)
    B0 = torch.randn(N, r, generator=g) / math.sqrt(r)
    b0 = torch.randn(N, generator=g) if bias else None
    for scaling in (2.0, 16 / math.sqrt(r)):  # alpha/r and rsLoRA's alpha/sqrt(r)
        x, A, B = _leaf(x0), _leaf(A0), _leaf(B0)
        b = _leaf(b0) if bias else None
        torch.manual_seed(123)
        if base == "4bit":
            y = qk.lora_linear_4bit(x, packed, state, A, B, scaling, b, dropout_p=dropout, training=True)
        else:
            y = qk.lora_linear(x, Wd, A, B, scaling, b, dropout_p=dropout, training=True)
        xr, Ar, Br = _leaf(x0), _leaf(A0), _leaf(B0)
        br = _leaf(b0) if bias else None
        yr = reference(xr, Wd, Ar, Br, scaling, br, dropout, True, 123)
        K_eff = K + r
        mag = (x0.abs() @ (Wd.abs().t() + scaling * A0.abs().t() @ B0.abs().t()))
        if dropout:
            mag = mag / (1 - dropout)
        tol = (K_eff + 4) * EPS32 * mag * 2
        assert_within(y.detach().reshape(-1, N), yr.detach().reshape(-1, N), tol.reshape(-1, N), "forward")
        dy = torch.randn_like(y)
        y.backward(dy)
        yr.backward(dy)
        for name, got, want in (("dx", x.grad, xr.grad), ("dA", A.grad, Ar.grad), ("dB", B.grad, Br.grad)) + (
                (("dbias", b.grad, br.grad),) if bias else ()):
            scale = want.abs().max().item() + 1e-12
            err = (got - want).abs().max().item()
            assert err <= 1e-4 * scale, f"{name}: max error {err:.3g} vs magnitude {scale:.3g} (scaling {scaling})"


def test_dropout_mask_is_torchs_and_reproducible(path):
    packed, state, Wd = make_weight(16, 32)
    x = torch.randn(64, 32)
    A, B = torch.randn(4, 32), torch.randn(16, 4)
    torch.manual_seed(5)
    y1 = qk.lora_linear_4bit(x, packed, state, A, B, 1.0, dropout_p=0.5, training=True)
    torch.manual_seed(5)
    y2 = qk.lora_linear_4bit(x, packed, state, A, B, 1.0, dropout_p=0.5, training=True)
    assert torch.equal(y1, y2)
    torch.manual_seed(5)
    mask_x = F.dropout(x, 0.5, True)
    torch.testing.assert_close(y1, x @ Wd.t() + (mask_x @ A.t()) @ B.t(), rtol=1e-5, atol=1e-5)
    # not training: no dropout, and the generator is not consumed
    state_before = torch.get_rng_state()
    y3 = qk.lora_linear_4bit(x, packed, state, A, B, 1.0, dropout_p=0.5, training=False)
    assert torch.equal(torch.get_rng_state(), state_before)
    torch.testing.assert_close(y3, x @ Wd.t() + (x @ A.t()) @ B.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_lora_half_precision(path, dtype):
    packed, state, Wd = make_weight(40, 72)
    x = torch.randn(6, 72).to(dtype).requires_grad_()
    A = (torch.randn(8, 72) * 0.1).requires_grad_()
    B = (torch.randn(40, 8) * 0.1).requires_grad_()
    y = qk.lora_linear_4bit(x, packed, state, A, B, 2.0)
    assert y.dtype == dtype
    ref = x.detach().float() @ Wd.t() + 2.0 * (x.detach().float() @ A.detach().t()) @ B.detach().t()
    torch.testing.assert_close(y.float(), ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and A.grad.dtype == torch.float32


def test_frozen_x_gives_no_input_grad(path):
    packed, state, _ = make_weight(8, 16)
    x = torch.randn(3, 16)
    A = torch.randn(2, 16, requires_grad=True)
    B = torch.randn(8, 2, requires_grad=True)
    qk.lora_linear_4bit(x, packed, state, A, B, 1.0).sum().backward()
    assert A.grad is not None and B.grad is not None
