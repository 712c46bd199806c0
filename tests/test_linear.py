"""linear_4bit and its input gradient on every backend and CPU path, against the
reference definition (dequantize, then fp32 torch)."""
import pytest
import torch

import qlora_kernels as qk

from .conftest import kernel_paths, native_paths, on_path

EPS32 = 2.0**-24


def dot_bound(x: torch.Tensor, W: torch.Tensor, extra_rel: float = 0.0) -> torch.Tensor:
    """Worst-case fp32 error of any summation order of x @ W.T: K * u * (|x| @ |W|.T), plus
    a relative allowance for rounding the output to a 16-bit dtype."""
    K = x.shape[-1]
    return (K + 2) * EPS32 * (x.abs().double() @ W.abs().double().t()) + 1e-30


def assert_within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    err = (y.double() - ref.double()).abs()
    worst = (err - bound).max().item() if err.numel() else -1
    assert worst <= 0, f"{what}: error exceeds the fp32 bound by {worst:.3g} (max err {err.max().item():.3g})"


def make_weight(N, K, quant_type="nf4", blocksize=64, double_quant=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    packed, state = qk.quantize_4bit(W, quant_type, blocksize, double_quant)
    return packed, state, qk.dequantize_4bit(packed, state)


SHAPES = [  # (leading dims of x, K, N)
    ((1,), 64, 64), ((7,), 70, 33), ((512,), 65, 7), ((4096,), 33, 17), ((2, 3), 130, 129), ((1,), 1, 5),
    ((3,), 7, 1), ((5,), 4097, 9), ((9,), 256, 1000),
]


@pytest.mark.parametrize("lead,K,N", SHAPES, ids=[f"{l}x{K}->{N}" for l, K, N in SHAPES])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_forward_and_input_grad_match_reference(path, lead, K, N, bias):
    for quant_type, blocksize, dq in (("nf4", 64, False), ("fp4", 128, True), ("nf4", 32, True)):
        packed, state, Wd = make_weight(N, K, quant_type, blocksize, dq, seed=K * N)
        x = torch.randn(*lead, K, requires_grad=True)
        b = torch.randn(N, requires_grad=True) if bias else None
        y = qk.linear_4bit(x, packed, state, b)
        ref = x.detach() @ Wd.t() + (b.detach() if bias else 0)
        assert y.shape == (*lead, N) and y.dtype == torch.float32
        bound = dot_bound(x.detach().reshape(-1, K), Wd)
        if bias:  # adding the bias rounds once more
            bound = bound + 2 * EPS32 * ref.reshape(-1, N).abs().double()
        assert_within(y.detach().reshape(-1, N), ref.reshape(-1, N), bound, f"forward {quant_type} bs{blocksize}")
        dy = torch.randn_like(y)
        y.backward(dy)
        assert_within(x.grad.reshape(-1, K), (dy.reshape(-1, N) @ Wd), dot_bound(dy.reshape(-1, N), Wd.t()),
                      "input grad")
        if bias:
            torch.testing.assert_close(b.grad, dy.reshape(-1, N).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_activations(path, dtype):
    packed, state, Wd = make_weight(48, 96)
    x = torch.randn(5, 96).to(dtype).requires_grad_()
    y = qk.linear_4bit(x, packed, state)
    assert y.dtype == dtype
    ref = x.detach().float() @ Wd.t()
    # fp32 arithmetic, then one rounding to the 16-bit dtype
    tol = dot_bound(x.detach().float(), Wd) + ref.abs() * torch.finfo(dtype).eps
    assert_within(y.detach().float(), ref, tol, str(dtype))
    y.float().sum().backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("isa", kernel_paths())
def test_realistic_layer_on_each_cpu_path(isa):
    packed, state, Wd = make_weight(1024, 1024)
    with on_path("cpu", isa):
        for m in (1, 3, 64):
            x = torch.randn(m, 1024)
            assert_within(qk.linear_4bit(x, packed, state), x @ Wd.t(), dot_bound(x, Wd), f"{isa} M={m}")
            dy = torch.randn(m, 1024)
            dx = torch.ops.qlora_kernels.linear_4bit_grad_input(dy, packed, state.absmax, 64, "nf4", 1024)
            assert_within(dx, dy @ Wd, dot_bound(dy, Wd.t()), f"{isa} grad M={m}")


SHUF_SHAPES = [  # (M, K, N, blocksize): the AVX2 byte-shuffle GEMV (blocks of whole 64-element chunks)
    (1, 64, 1, 64), (1, 128, 7, 64), (3, 192, 33, 64), (8, 256, 9, 128), (2, 1024, 5, 256), (1, 4096, 3, 4096),
    (5, 640, 17, 64), (4, 512, 64, 512),
]


@pytest.mark.parametrize("M,K,N,blocksize", SHUF_SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_byte_shuffle_gemv_matches_reference(M, K, N, blocksize, quant_type):
    """The AVX2 forward for few rows decodes with byte shuffles (csrc/linear4_gemv_shuf.h):
    every lookup order and block scale, against the reference within the fp32 bound; the
    plan names it, and other paths still take it where the AVX2 path is forced."""
    from qlora_kernels import _C

    packed, state, Wd = make_weight(N, K, quant_type, blocksize, seed=M + K + N)
    x = torch.randn(M, K)
    bias = torch.randn(N)
    for isa in native_paths():
        with on_path("cpu", isa):
            y = qk.linear_4bit(x, packed, state, bias)
            if isa == "avx2":
                assert _C.linear4_plan(M, N, K, blocksize) == "gemv-shuf"
        ref = x @ Wd.t() + bias
        assert_within(y, ref, dot_bound(x, Wd) + 2 * EPS32 * ((x @ Wd.t()).abs() + bias.abs()).double(), isa)
