"""linear_4bit(..., compute="int8"): the int8-compute forward (x quantized per block, the
codebook as int8, exact integer dots) on every CPU path against its pure-torch
definition (backends.reference.linear_4bit_int8), its accuracy against fp32, its op
contract and its bad input."""
import pathlib

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _C, formats
from qlora_kernels.backends import reference

from .conftest import native_paths, on_path

EPS32 = 2.0**-24


def make(M, N, K, blocksize=64, quant_type="nf4", seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(*lead, M, K, generator=g)
    packed, state = qk.quantize_4bit(W, quant_type, blocksize)
    return x, packed, state


def magnitude(x2, packed, state):
    """sum_k |xq * sx| * |code8 * absmax| per output: what the fp32 part of the int8
    kernels sums, so their rounding is bounded by a multiple of it."""
    (M, K), N, bs = x2.shape, state.shape[0], state.blocksize
    xq, sx = reference.quantize_x_groups(x2, bs)
    xs = xq.abs().double() * sx.double().repeat_interleave(bs, 1)[:, :K]
    c8 = formats.int8_codebook(state.quant_type).double()[reference._nibbles(packed, N * K)].view(N, K)
    flat = torch.arange(N * K).view(N, K)
    ws = c8.abs() * state.absmax.double()[flat // bs]
    return xs @ ws.t()


def assert_int8_close(y, ref, mag, K, what=""):
    # fp32 sums of partial sums of at most 8 products, one product and one conversion
    # each: far inside (K/8 + 3) * u * magnitude.
    bound = (K / 8 + 3) * EPS32 * mag + 1e-30
    err = (y.double() - ref.double()).abs()
    worst = (err - bound).max().item() if err.numel() else -1
    assert worst <= 0, f"{what}: int8 path off its definition by {err.max().item():.3g}"


SHAPES = [  # (M, N, K, blocksize)
    (1, 1, 128, 64), (1, 7, 4096, 64), (7, 33, 256, 32), (2, 16, 384, 256), (3, 9, 640, 128),
    (1, 4, 4096, 4096), (4, 5, 96, 32), (1, 7, 4097, 64), (2, 3, 200, 128), (1, 300, 1024, 64),
    (2, 6, 192, 64), (3, 5, 320, 32),  # whole 64- but not 128-element chunks: the AVX2 kernel on every SIMD ISA
    (33, 20, 512, 64), (17, 9, 2304, 32), (70, 6, 256, 128),  # groups of 16 rows, K slices, 64-row tiles
]


@pytest.mark.parametrize("isa", native_paths())
@pytest.mark.parametrize("M,N,K,blocksize", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_int8_matches_its_definition(isa, M, N, K, blocksize, quant_type):
    x, packed, state = make(M, N, K, blocksize, quant_type)
    bias = torch.randn(N)
    ref = reference.linear_4bit_int8(x, packed, state.absmax, blocksize, quant_type, N, bias)
    with on_path("cpu", isa):
        y = qk.linear_4bit(x, packed, state, bias, compute="int8")
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert_int8_close(y - bias, ref - bias, magnitude(x, packed, state), K, f"{isa} {M}x{N}x{K} bs{blocksize}")


def test_int8_reaches_each_kernel_where_the_cpu_has_it():
    flags = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    vnni = "avx512_vnni" in flags and "avx512vbmi" in flags
    expected = {"scalar": "scalar", "avx2": "avx2", "avx512": "avx512-vnni" if vnni else "avx2"}
    for isa in native_paths():
        with on_path("cpu", isa):
            assert _C.linear4_q8_plan(4096, 4096, 64) == expected[isa], isa
            assert _C.linear4_q8_plan(4096, 192, 64) == ("scalar" if isa == "scalar" else "avx2")
            assert _C.linear4_q8_plan(4096, 4100, 64) == "scalar"  # K not whole 64-element chunks


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_int8_accuracy_against_fp32(quant_type, blocksize):
    # The price of int8 arithmetic: ~1% relative (ONNX Runtime's accuracy_level=4 costs
    # ~0.6% on the same kind of data with exact int4 weights; NF4 codes also round).
    x, packed, state = make(4, 256, 1024, blocksize, quant_type, lead=(2,))
    y8 = qk.linear_4bit(x, packed, state, compute="int8")
    y32 = qk.linear_4bit(x, packed, state)
    rel = ((y8 - y32).norm() / y32.norm()).item()
    assert 1e-4 < rel < 0.02, rel


def test_int8_ties_round_to_even_like_the_definition():
    # amax 127 makes 127 / amax exactly 1, so x = +-0.5, 1.5, 2.5 are exact ties.
    K = 128
    x = torch.zeros(1, K)
    x[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])
    x[0, 64:66] = torch.tensor([-127.0, 3.5])
    W = torch.randn(8, K) * 0.05
    packed, state = qk.quantize_4bit(W, "nf4", 64)
    xq, _ = reference.quantize_x_groups(x, 64)
    assert xq[0, :6].tolist() == [127, 0, 2, 2, 0, -2] and xq[0, 64:66].tolist() == [-127, 4]
    ref = reference.linear_4bit_int8(x, packed, state.absmax, 64, "nf4", 8, None)
    for isa in native_paths():
        with on_path("cpu", isa):
            y = qk.linear_4bit(x, packed, state, compute="int8")
        assert_int8_close(y, ref, magnitude(x, packed, state), K, isa)


@pytest.mark.parametrize("isa", native_paths())
def test_int8_zero_and_nonfinite_rows(isa):
    x, packed, state = make(3, 6, 256, 64)
    x[0] = 0.0
    x[1, 70] = float("nan")
    x[2, 3] = float("inf")
    bias = torch.arange(6.0)
    with on_path("cpu", isa):
        y = qk.linear_4bit(x, packed, state, bias, compute="int8")
    assert torch.equal(y[0], bias)  # an all-zero row: exactly the bias
    assert y[1:].isnan().all()  # NaN/Inf anywhere in a row poison that row, as in fp32


def test_int8_gradient_is_the_fp32_one():
    x, packed, state = make(5, 12, 256, 64, lead=(2,))
    bias = torch.randn(12, requires_grad=True)
    dy = torch.randn(2, 5, 12)
    xa = x.clone().requires_grad_()
    qk.linear_4bit(xa, packed, state, bias, compute="int8").backward(dy)
    xb = x.clone().requires_grad_()
    bias_b = bias.detach().clone().requires_grad_()
    qk.linear_4bit(xb, packed, state, bias_b).backward(dy)
    assert torch.equal(xa.grad, xb.grad) and torch.allclose(bias.grad, bias_b.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_half_inputs(dtype):
    x, packed, state = make(3, 10, 256, 64)
    xh = x.to(dtype)
    y = qk.linear_4bit(xh, packed, state, compute="int8")
    assert y.dtype == dtype
    ref = reference.linear_4bit_int8(xh.float(), packed, state.absmax, 64, "nf4", 10, None)
    torch.testing.assert_close(y.float(), ref, rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_int8_opcheck_and_compile():
    x, packed, state = make(3, 9, 256, 64)
    torch.library.opcheck(torch.ops.qlora_kernels.linear_4bit_int8.default,
                          (x.requires_grad_(), packed, state.absmax, 64, "nf4", 9, torch.randn(9)))

    layer = qk.nn.Linear4bit.from_linear(torch.nn.Linear(256, 9), compute="int8")
    xc = torch.randn(2, 256)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(xc), layer(xc), rtol=0, atol=1e-6)


def test_int8_module():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 20)
    layer = qk.nn.Linear4bit.from_linear(lin, compute="int8")
    x = torch.randn(4, 256)
    ref = reference.linear_4bit_int8(x, layer.weight, layer.quant_state.absmax, 64, "nf4", 20, lin.bias.detach())
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert "compute=int8" in repr(layer)
    layer.compute = "fp32"
    torch.testing.assert_close(layer(x), qk.linear_4bit(x, layer.weight, layer.quant_state, lin.bias))
    with pytest.raises(ValueError, match="compute"):
        qk.nn.Linear4bit(16, 8, compute="int4")


def test_bad_compute_names_the_argument():
    x, packed, state = make(1, 4, 128, 64)
    with pytest.raises(ValueError, match="compute must be one of"):
        qk.linear_4bit(x, packed, state, compute="bf16")


def test_fast_path_sees_in_place_changes():
    # The inference fast path remembers a validated weight; an in-place change of the
    # weight or its absmax must not leave it computing with stale values.
    x, packed, state = make(1, 8, 256, 64)
    with torch.no_grad():
        for compute in ("fp32", "int8"):
            y0 = qk.linear_4bit(x, packed, state, compute=compute)
            state.absmax.mul_(2)
            torch.testing.assert_close(qk.linear_4bit(x, packed, state, compute=compute), 2 * y0, rtol=1e-5, atol=0)
            state.absmax.div_(2)
            packed.bitwise_xor_(0x11)
            assert not torch.allclose(qk.linear_4bit(x, packed, state, compute=compute), y0)
            packed.bitwise_xor_(0x11)
            torch.testing.assert_close(qk.linear_4bit(x, packed, state, compute=compute), y0, rtol=0, atol=0)
        with pytest.raises(ValueError, match="features"):
            qk.linear_4bit(torch.randn(1, 128), packed, state)
