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
def test_lora_matches_reference(path, lead, K, N, r, dropout, bias, base, monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS_DROPOUT", "torch")  # F.dropout's masks, as the reference draws them
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


def test_dropout_mask_is_torchs_and_reproducible(path, monkeypatch):
    """QLORA_KERNELS_DROPOUT=torch: the very mask F.dropout (PEFT's nn.Dropout) draws."""
    monkeypatch.setenv("QLORA_KERNELS_DROPOUT", "torch")
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


def _native_mask(shape, p, seed):
    """The native mask of csrc/dropout.cpp for a generator state: one int64 seed drawn from
    torch's generator, then element i a function of (seed, i)."""
    from qlora_kernels import _C

    torch.manual_seed(seed)
    s = int(torch.empty((), dtype=torch.int64).random_())
    m = torch.empty(shape)
    _C.dropout_mask(m.data_ptr(), m.numel(), p, s, 1)
    return m


def test_native_dropout_mask_is_used_and_reproducible(path):
    """The default: the native mask, from one seed of torch's generator (manual_seed
    reproduces it); the op's output and gradients equal the reference with that mask."""
    packed, state, Wd = make_weight(24, 80)
    g = torch.Generator().manual_seed(1)
    x0, A, B = torch.randn(300, 80, generator=g), torch.randn(8, 80, generator=g), torch.randn(24, 8, generator=g)
    outs = []
    for _ in range(2):
        x = x0.clone().requires_grad_()
        torch.manual_seed(7)
        y = qk.lora_linear_4bit(x, packed, state, A, B, 0.5, dropout_p=0.3, training=True)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    mask = _native_mask((300, 80), 0.3, 7)
    xr = x0.clone().requires_grad_()
    yr = xr @ Wd.t() + 0.5 * ((xr * mask) @ A.t()) @ B.t()
    yr.square().sum().backward()
    torch.testing.assert_close(outs[0][0], yr.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(outs[0][1], xr.grad, rtol=1e-4, atol=1e-3)
    torch.manual_seed(8)
    y8 = qk.lora_linear_4bit(x0, packed, state, A, B, 0.5, dropout_p=0.3, training=True)
    assert not torch.equal(y8, outs[0][0])  # another seed, another mask


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_native_dropout_mask_statistics_and_thread_count(p):
    """Values are exactly 0 or torch's 1 / (1 - p); the kept fraction lies within 6 standard
    deviations of 1 - p; neighbouring elements and rows are uncorrelated; the same mask for
    1, 2 or 3 threads (element i depends only on the seed and i)."""
    from qlora_kernels import _C

    n = 1 << 20
    masks = []
    for threads in (1, 2, 3):
        m = torch.empty(n)
        _C.dropout_mask(m.data_ptr(), n, p, 0x1234_5678_9ABC, threads)
        masks.append(m)
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    m = masks[0]
    keep = torch.ones(1).bernoulli_(1.0).div_(1 - p).item()  # torch's kept value
    assert set(m.unique().tolist()) <= {0.0, keep}
    kept = (m != 0).double()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(kept.mean().item() - (1 - p)) < 6 * sd
    for lag in (1, 2, 64, 576):
        c = torch.corrcoef(torch.stack([kept[:-lag], kept[lag:]]))[0, 1].item()
        assert abs(c) < 6 / n ** 0.5, f"lag {lag}: correlation {c:.4g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_native_dropout_with_half_precision_x(dtype):
    """The native mask stays fp32 for a 16-bit x (the kernels widen x; 1/(1-p) is not rounded
    to the 16-bit type); the output is x's dtype and equals the fp32 computation rounded once."""
    packed, state, Wd = make_weight(24, 80)
    g = torch.Generator().manual_seed(2)
    x, A, B = torch.randn(40, 80, generator=g), torch.randn(4, 80, generator=g), torch.randn(24, 4, generator=g)
    xh = x.to(dtype)
    torch.manual_seed(3)
    y = qk.lora_linear_4bit(xh, packed, state, A, B, 0.5, dropout_p=0.2, training=True)
    assert y.dtype == dtype
    mask = _native_mask((40, 80), 0.2, 3)
    xf = xh.float()
    ref = xf @ Wd.t() + 0.5 * ((xf * mask) @ A.t()) @ B.t()
    torch.testing.assert_close(y.float(), ref, rtol=torch.finfo(dtype).eps * 2, atol=torch.finfo(dtype).eps * 4)


def test_native_dropout_mask_refuses_bad_p():
    from qlora_kernels import _C

    m = torch.empty(4)
    for p in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dropout p must be in"):
            _C.dropout_mask(m.data_ptr(), 4, p, 1, 1)


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


# The cpu backend runs the LoRA forward of few rows as one native call (csrc/lora4.h);
# held to fp64 on awkward shapes: K not a multiple of the blocksize (blocks straddle rows),
# K above a 4096 chunk, N and r of 1, rows on both sides of the cpu kernel's row limit.
FEW_ROWS = [  # (M, K, N, r)
    (1, 100, 7, 16), (2, 100, 1, 1), (3, 4097, 7, 16), (1, 64, 1, 1), (2, 33, 7, 3), (4, 130, 7, 16),
    (7, 4097, 7, 16), (9, 100, 7, 16),
]


@pytest.mark.parametrize("M,K,N,r", FEW_ROWS, ids=[f"{M}x{K}->{N}r{r}" for M, K, N, r in FEW_ROWS])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_few_row_lora_forward_matches_fp64(path, M, K, N, r, quant_type, bias):
    packed, state, Wd = make_weight(N, K, quant_type, blocksize=64, seed=K + r)
    g = torch.Generator().manual_seed(M + K + N + r)
    x = torch.randn(M, K, generator=g)
    A = torch.randn(r, K, generator=g) / math.sqrt(K)
    B = torch.randn(N, r, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    noise = (torch.rand(M, K, generator=g) >= 0.25).float() / 0.75
    s = 16 / math.sqrt(r)
    w = qk.prepare_4bit(packed, state)
    for n in (None, noise):
        xd = x.double() if n is None else (x * n).double()  # torch rounds x * noise to fp32 first
        u_ref = xd @ A.double().t()
        y_ref = x.double() @ Wd.double().t() + s * u_ref @ B.double().t() + (0 if b is None else b.double())
        mag = x.abs().double() @ Wd.abs().double().t() + s * (xd.abs() @ A.abs().double().t()) @ B.abs().double().t()
        tol = (K + r + 4) * EPS32 * 2 * mag + 1e-30
        with torch.no_grad():
            y, u = torch.ops.qlora_kernels.lora_linear_4bit(x, packed, state.absmax, 64, quant_type, N, A, B, s, b, n)
            assert_within(y, y_ref, tol, f"y (noise {n is not None})")
            assert_within(u, u_ref, (K + 2) * EPS32 * (xd.abs() @ A.abs().double().t()) + 1e-30, "u")
            if n is None:  # the inference routes (prepared weight, and packed with state) on [batch, seq, K]
                x3 = x.reshape(1, M, K)
                assert_within(qk.lora_linear_4bit(x3, w, None, A, B, s, b)[0], y_ref, tol, "prepared")
                assert_within(qk.lora_linear_4bit(x3, packed, state, A, B, s, b)[0], y_ref, tol, "packed, state")


def test_one_row_inference_is_one_native_call():
    """The decode step: no torch matmul for the adapter on the cpu backend (each cost an
    operator dispatch and an OpenMP fork/join, several times its arithmetic)."""
    from qlora_kernels.backends import cpu

    packed, state, Wd = make_weight(24, 100)
    w = qk.prepare_4bit(packed, state)
    x, A, B = torch.randn(1, 1, 100), torch.randn(4, 100), torch.randn(24, 4)
    with qk.use_backend("cpu"), torch.no_grad(), torch.profiler.profile() as prof:
        y = qk.lora_linear_4bit(x, w, None, A, B, 2.0)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul"}, names
    assert y.shape == (1, 1, 24) and cpu.LORA_FUSED_ROWS >= 1
    torch.testing.assert_close(y, x @ Wd.t() + 2.0 * (x @ A.t()) @ B.t(), rtol=1e-5, atol=1e-4)


def test_many_row_native_calls_check_sizes():
    """csrc/lora_rows.cpp refuses element counts that do not match the shape it is told."""
    from qlora_kernels import _C

    M, K, N, r = 6, 10, 7, 3
    x, A, B = torch.randn(M, K), torch.randn(r, K), torch.randn(N, r)
    y, u = torch.zeros(M, N), torch.empty(M, r)
    args = [x.data_ptr(), x.numel(), M, K, A.data_ptr(), A.numel(), B.data_ptr(), B.numel(), r, 1.0, y.data_ptr(),
            y.numel(), N, u.data_ptr(), u.numel(), 2]
    _C.lora_rows_forward(*args)
    bad = list(args)
    bad[5] = A.numel() - 1
    with pytest.raises(ValueError, match="lora_A has 29 elements, expected 30"):
        _C.lora_rows_forward(*bad)
    bad = list(args)
    bad[14] = u.numel() + 1
    with pytest.raises(ValueError, match="u has"):
        _C.lora_rows_forward(*bad)
    dy, dA, dB, dx = torch.randn(M, N), torch.empty(r, K), torch.empty(N, r), torch.zeros(M, K)
    bargs = [dy.data_ptr(), dy.numel(), x.data_ptr(), x.numel(), u.data_ptr(), u.numel(), M, K, N, A.data_ptr(),
             A.numel(), B.data_ptr(), B.numel(), r, 1.0, dA.data_ptr(), dA.numel(), dB.data_ptr(), dB.numel(),
             dx.data_ptr(), dx.numel(), 2]
    _C.lora_rows_backward(*bargs)
    du = dy @ B
    torch.testing.assert_close(dA, du.t() @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dB, dy.t() @ u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, du @ A, rtol=1e-5, atol=1e-5)
    bad = list(bargs)
    bad[20] = dx.numel() - 1
    with pytest.raises(ValueError, match="dx has"):
        _C.lora_rows_backward(*bad)
    bad = list(bargs)
    bad[6] = 0
    with pytest.raises(ValueError, match="every dimension must be >= 1"):
        _C.lora_rows_backward(*bad)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_row_lora_same_bits_for_any_thread_count(threads):
    """Rows split for u / du / dx, features for dA / dB: one thread sums each element."""
    packed, state, _ = make_weight(130, 96, seed=5)
    g = torch.Generator().manual_seed(9)
    x0, A0, B0 = torch.randn(300, 96, generator=g), torch.randn(16, 96, generator=g), torch.randn(130, 16, generator=g)
    dy = torch.randn(300, 130, generator=g)

    def run(n):
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            x, A, B = _leaf(x0), _leaf(A0), _leaf(B0)
            y = qk.lora_linear_4bit(x, packed, state, A, B, 2.0)
            y.backward(dy)
            return y.detach(), x.grad, A.grad, B.grad
        finally:
            torch.set_num_threads(before)

    for a, b in zip(run(1), run(threads)):
        assert torch.equal(a, b)
