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
    (1, 6, 1664, 128),  # 13 blocks a row, 3 of padding in its last panel: the repacked kernels still take it
]


def int8_cases():
    """(variant, isa, M, N, K, blocksize) for every int8 kernel variant this CPU runs on each
    shape, the variant read from the plan the extension reports for the forced ISA (never
    from the CPU's name): 'avx512-vnni', 'avx2', 'scalar', and 'avx512-vnni-repacked' (the
    one-row kernel on the repacked weight) and 'avx2-repacked' where the CPU has them. A shape that a SIMD kernel
    hands to another one appears once, under the kernel that runs it."""
    cases = {}
    for isa in native_paths():
        with on_path("cpu", isa):
            for M, N, K, bs in SHAPES:
                cases.setdefault((_C.linear4_q8_plan(N, K, bs), M, N, K, bs), isa)
                if _C.linear4_q8_repacked_fits(N, K, bs):
                    cases.setdefault((_C.linear4_q8_repacked_plan(N, K, bs), M, N, K, bs), isa)
    return [pytest.param(v, isa, M, N, K, bs, id=f"{v}-{M}x{N}x{K}-bs{bs}")
            for (v, M, N, K, bs), isa in sorted(cases.items())]


@pytest.mark.parametrize("variant,isa,M,N,K,blocksize", int8_cases())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_int8_matches_its_definition(variant, isa, M, N, K, blocksize, quant_type):
    x, packed, state = make(M, N, K, blocksize, quant_type)
    bias = torch.randn(N)
    ref = reference.linear_4bit_int8(x, packed, state.absmax, blocksize, quant_type, N, bias)
    with on_path("cpu", isa):
        if variant.endswith("-repacked"):
            y = run_repacked(x, packed, state, bias)
        else:
            assert _C.linear4_q8_plan(N, K, blocksize) == variant
            y = qk.linear_4bit(x, packed, state, bias, compute="int8")
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert_int8_close(y - bias, ref - bias, magnitude(x, packed, state), K, f"{variant} {M}x{N}x{K} bs{blocksize}")


def test_int8_variants_cover_every_kernel_the_cpu_runs():
    """Each int8 kernel that the extension reaches on some forced ISA has test cases."""
    variants = {p.values[0] for p in int8_cases()}
    assert "scalar" in variants
    for isa in native_paths():
        with on_path("cpu", isa):
            assert _C.linear4_q8_plan(4096, 4096, 64) in variants
            if _C.linear4_q8_repacked_fits(4096, 4096, 64):
                assert _C.linear4_q8_repacked_plan(4096, 4096, 64) in variants


def test_int8_reaches_each_kernel_where_the_cpu_has_it():
    flags = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    vnni = "avx512_vnni" in flags and "avx512vbmi" in flags and "avx512f" in flags
    # cpuid's best path (QLORA_KERNELS_ISA may cap the runnable ones below it)
    assert (_C.best_isa() == "avx512vnni") == (vnni and _C.best_isa() in ("avx512", "avx512vnni"))
    expected = {"scalar": "scalar", "avx2": "avx2", "avx512": "avx2", "avx512vnni": "avx512-vnni"}
    repacked = {"scalar": "", "avx2": "avx2-repacked", "avx512": "avx2-repacked", "avx512vnni": "avx512-vnni-repacked"}
    for isa in native_paths():
        with on_path("cpu", isa):
            assert _C.linear4_q8_plan(4096, 4096, 64) == expected[isa], isa
            assert _C.linear4_q8_repacked_plan(4096, 4096, 64) == repacked[isa], isa
            assert _C.linear4_q8_repacked_fits(4096, 4096, 64) == (isa != "scalar")
            assert _C.linear4_q8_repacked_plan(4096, 4100, 64) == ""  # K not whole blocks: no repacked layout
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
            qk.linear_4bit(x, packed, state, compute=compute)  # validates and remembers the weight
            y0 = qk.linear_4bit(x, packed, state, compute=compute)  # the fast path (one row int8: repacked)
            state.absmax.mul_(2)
            torch.testing.assert_close(qk.linear_4bit(x, packed, state, compute=compute), 2 * y0, rtol=1e-5, atol=0)
            state.absmax.div_(2)
            packed.bitwise_xor_(0x11)
            assert not torch.allclose(qk.linear_4bit(x, packed, state, compute=compute), y0)
            packed.bitwise_xor_(0x11)
            torch.testing.assert_close(qk.linear_4bit(x, packed, state, compute=compute), y0, rtol=0, atol=0)
        with pytest.raises(ValueError, match="features"):
            qk.linear_4bit(torch.randn(1, 128), packed, state)


# ---- the one-row kernel on a repacked weight (csrc/linear4_q8.h) ----

def repacked_by_torch(packed, N, K, bs):
    """The repacked layout, stated again with torch indexing: rows cut into panels of 16
    blocks, byte 4j + i of vector v of a panel = byte 4v + i of the panel's block j."""
    nb, P = K // bs, -(-(K // bs) // 16)
    rows = packed.view(N, nb, bs // 2)
    rows = torch.cat([rows, rows.new_zeros(N, P * 16 - nb, bs // 2)], 1)
    return rows.view(N, P, 16, bs // 8, 4).permute(0, 1, 3, 2, 4).reshape(-1)


REPACK_SHAPES = [  # (N, K, blocksize): whole panels, short last panels (padding <= a quarter), awkward N
    (1, 1024, 64), (7, 1664, 128), (33, 1664, 32), (5, 4096, 128), (3, 3328, 256), (300, 1024, 64), (2, 2048, 64),
    (4, 96, 32),  # K not whole 128-element chunks: no VNNI kernel (the AVX2 one on VNNI CPUs)
    (9, 4096, 4096),  # one block a row (15 of padding): no repacked kernel on any path, the chunked ones run it
]
HEAVILY_PADDED = {(9, 4096, 4096)}


def test_repack_shapes_reach_the_repacked_kernels():
    """Every SIMD path has a repacked kernel for the shapes above that are meant to run one
    (so the tests below cannot silently fall to the refusal branch)."""
    for isa in native_paths():
        with on_path("cpu", isa):
            for shape in REPACK_SHAPES:
                assert _C.linear4_q8_repacked_fits(*shape) == (isa != "scalar" and shape not in HEAVILY_PADDED), \
                    (isa, shape)


@pytest.mark.parametrize("N,K,blocksize", REPACK_SHAPES + [(3, 1536, 512), (1, 128, 64), (7, 384, 64),
                                                           (33, 1152, 32), (3, 2048, 256)])
def test_repacked_layout(N, K, blocksize):
    _, packed, _ = make(1, N, K, blocksize)
    nbytes = _C.linear4_q8_repacked_bytes(N, K, blocksize)
    out = torch.full((nbytes,), 0xAB, dtype=torch.uint8)
    _C.linear4_q8_repack(packed.data_ptr(), packed.numel(), N, K, blocksize, out.data_ptr(), nbytes, 2)
    assert torch.equal(out, repacked_by_torch(packed, N, K, blocksize))


def run_repacked(x, packed, state, bias=None):
    N, K, bs = state.shape[0], state.shape[1], state.blocksize
    nbytes = _C.linear4_q8_repacked_bytes(N, K, bs)
    rep = torch.empty(nbytes, dtype=torch.uint8)
    _C.linear4_q8_repack(packed.data_ptr(), packed.numel(), N, K, bs, rep.data_ptr(), nbytes, 2)
    y = torch.empty(x.shape[0], N)
    code8 = formats.int8_codebook(state.quant_type)
    _C.linear4_q8_forward_repacked(x.data_ptr(), x.shape[0], K, K, rep.data_ptr(), nbytes, state.absmax.data_ptr(),
                                   state.absmax.numel(), code8.data_ptr(), N, bs,
                                   0 if bias is None else bias.data_ptr(), 0 if bias is None else bias.numel(),
                                   y.data_ptr(), N, 2)
    return y


def repacked_cases():
    """(N, K, blocksize, isa) for each native path, named by the repacked kernel that path
    runs ('avx512-vnni-repacked', 'avx2-repacked'; 'none' where it has none), as the
    extension reports it for the forced ISA."""
    cases = []
    for isa in native_paths():
        with on_path("cpu", isa):
            for N, K, bs in REPACK_SHAPES:
                variant = _C.linear4_q8_repacked_plan(N, K, bs) or "none"
                cases.append(pytest.param(N, K, bs, isa, id=f"{variant}-{isa}-{N}x{K}-bs{bs}"))
    return cases


@pytest.mark.parametrize("N,K,blocksize,isa", repacked_cases())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_repacked_kernel_matches_its_definition(N, K, blocksize, isa, quant_type):
    x, packed, state = make(2, N, K, blocksize, quant_type)
    bias = torch.randn(N)
    with on_path("cpu", isa):
        if not _C.linear4_q8_repacked_fits(N, K, blocksize):
            # no such kernel on this path: the bindings refuse it, the fast path keeps to the others
            with pytest.raises(ValueError, match="no repacked int8 kernel"):
                run_repacked(x, packed, state, bias)
            return
        ref = reference.linear_4bit_int8(x, packed, state.absmax, blocksize, quant_type, N, bias)
        y = run_repacked(x, packed, state, bias)
        assert_int8_close(y - bias, ref - bias, magnitude(x, packed, state), K, f"repacked {N}x{K} bs{blocksize}")
        # A prepared weight's direct path runs it for one row, and gives the same bits.
        w = qk.functional.prepare_4bit(packed, state)
        with torch.no_grad():
            for _ in range(2):  # the first call makes the repacked copy
                y1 = qk.linear_4bit(x[:1], w, compute="int8")
        assert torch.equal(y1, run_repacked(x[:1], packed, state))
        assert w.has_int8_copy()


def test_repacked_zero_and_nonfinite_rows_and_forced_isas():
    x, packed, state = make(4, 40, 2048, 64)  # 32 blocks a row: two panels
    x[0] = 0.0
    x[1, 1500] = float("nan")
    x[2, 3] = float("-inf")
    ref = reference.linear_4bit_int8(x[3:], packed, state.absmax, 64, "nf4", 40, None)
    for isa in native_paths():  # each path's one-row kernel, on a weight prepared under it
        w = qk.functional.prepare_4bit(packed, state)
        with on_path("cpu", isa):
            ys = [qk.linear_4bit(x[m:m + 1], w, compute="int8") for m in range(4) for _ in range(2)][1::2]
            assert w.has_int8_copy() == _C.linear4_q8_repacked_fits(40, 2048, 64), isa
        assert torch.equal(ys[0], torch.zeros(1, 40)), isa
        assert ys[1].isnan().all() and ys[2].isnan().all(), isa
        assert_int8_close(ys[3], ref, magnitude(x[3:], packed, state), 2048, f"fast path {isa}")
    # A copy made under one path serves the others (same layout); a weight first called where
    # there is no repacked kernel gets one on the first path that has it.
    for first in native_paths():
        w = qk.functional.prepare_4bit(packed, state)
        with on_path("cpu", first):
            qk.linear_4bit(x[3:], w, compute="int8")
        for isa in native_paths():
            with on_path("cpu", isa):
                y = qk.linear_4bit(x[3:], w, compute="int8")
                if _C.linear4_q8_repacked_fits(40, 2048, 64):
                    assert w.has_int8_copy(), (first, isa)
                    assert torch.equal(y, run_repacked(x[3:], packed, state)), (first, isa)
            assert_int8_close(y, ref, magnitude(x[3:], packed, state), 2048, f"{first} then {isa}")


def test_repacked_kernels_at_the_int16_edge():
    """Every code +-127 against xq +-127 with matching signs: each vpmaddubsw pair sums to
    2 * 127^2 = 32258, next to int16's limit (a kernel that saturated, or offset the codes
    by 128 as the VNNI one does without its correction, would be off by percents)."""
    N, K, bs = 5, 2048, 64
    x = torch.ones(1, K)
    x[0, 1::3] = -1.0
    code8 = formats.int8_codebook("nf4")
    top, bottom = int(code8.argmax()), int(code8.argmin())
    assert code8[top] == 127 and code8[bottom] == -127
    nib = torch.where(x[0] > 0, top, bottom).to(torch.uint8).repeat(N)  # code sign = x's sign
    packed = (nib[0::2] << 4 | nib[1::2]).contiguous()
    _, state = qk.quantize_4bit(torch.randn(N, K), "nf4", bs)
    state.absmax = torch.full((N * K // bs,), 0.5)
    ref = reference.linear_4bit_int8(x, packed, state.absmax, bs, "nf4", N, None)
    assert torch.allclose(ref, torch.full((1, N), K * 0.5))
    mag = magnitude(x, packed, state)
    for isa in native_paths():
        with on_path("cpu", isa):
            assert_int8_close(qk.linear_4bit(x, packed, state, compute="int8"), ref, mag, K, isa)
            if _C.linear4_q8_repacked_fits(N, K, bs):
                assert_int8_close(run_repacked(x, packed, state), ref, mag, K, f"repacked {isa}")


def test_int8_limits_are_refused_at_the_bindings():
    """Codes in [-127, 127] and blocks of at most 2^16 elements (csrc/linear4_q8.h): a table
    with -128 (which the AVX2 kernels' sign transfer cannot negate) or a larger block (whose
    integer sums would overflow int32) is refused by name, never computed."""
    _, packed, state = make(1, 4, 256, 64)
    x, y = torch.randn(1, 256), torch.empty(1, 4)
    bad = formats.int8_codebook("nf4").clone()
    bad[0] = -128
    with pytest.raises(ValueError, match=r"code8 must hold values in \[-127, 127\]"):
        _C.linear4_q8_forward(x.data_ptr(), 1, 256, 256, packed.data_ptr(), packed.numel(), state.absmax.data_ptr(),
                              state.absmax.numel(), bad.data_ptr(), 4, 64, 0, 0, y.data_ptr(), 4, 1)
    big = 1 << 17
    p2, a2 = torch.zeros(big // 2, dtype=torch.uint8), torch.ones(1)
    x2, code8 = torch.randn(1, big), formats.int8_codebook("nf4")
    with pytest.raises(ValueError, match="at most 65536"):
        _C.linear4_q8_forward(x2.data_ptr(), 1, big, big, p2.data_ptr(), p2.numel(), a2.data_ptr(), 1,
                              code8.data_ptr(), 1, big, 0, 0, y.data_ptr(), 1, 1)
    with pytest.raises(ValueError, match="at most 65536"):
        _C.linear4_q8_repacked_bytes(1, big, big)
    assert not _C.linear4_q8_repacked_fits(1, big, big)
    _, packed, state = make(1, 4, 1024, 64)  # one whole panel a row: every SIMD path has a repacked kernel
    x = torch.randn(1, 1024)
    for isa in native_paths():
        with on_path("cpu", isa):
            assert _C.linear4_q8_repacked_fits(4, 1024, 64) == (isa != "scalar"), isa
            if isa != "scalar":
                out = torch.empty(_C.linear4_q8_repacked_bytes(4, 1024, 64), dtype=torch.uint8)
                with pytest.raises(ValueError, match=r"code8 must hold values in \[-127, 127\]"):
                    _C.linear4_q8_forward_repacked(x.data_ptr(), 1, 1024, 1024, out.data_ptr(), out.numel(),
                                                   state.absmax.data_ptr(), state.absmax.numel(), bad.data_ptr(), 4,
                                                   64, 0, 0, y.data_ptr(), 4, 1)


def test_repacked_kernels_skip_heavily_padded_rows():
    """The repacked kernels work through the padding of a row's last panel: they are chosen
    where that padding is at most a quarter of the row, or (AVX2) where the chunked AVX2
    kernel does not take the shape."""
    for isa in native_paths():
        if isa == "scalar":
            continue
        with on_path("cpu", isa):
            vnni = isa == "avx512vnni"
            assert _C.linear4_q8_repacked_plan(8, 1024, 64) == ("avx512-vnni-repacked" if vnni else "avx2-repacked")
            # 13 blocks a row (3 of padding); K not whole 128-element chunks: no VNNI kernel
            assert _C.linear4_q8_repacked_plan(8, 832, 64) == "avx2-repacked"
            assert _C.linear4_q8_repacked_plan(8, 576, 64) == ""  # 9 blocks a row: 16 with padding
            assert _C.linear4_q8_repacked_plan(8, 96, 32) == "avx2-repacked"  # 3 blocks, but no chunked kernel
            assert _C.linear4_q8_repacked_plan(8, 1664, 128) == ("avx512-vnni-repacked" if vnni else "avx2-repacked")
            # one block a row (15 of padding), 8 blocks (8 of padding): the chunked kernels on every path
            assert _C.linear4_q8_repacked_plan(8, 4096, 4096) == ""
            assert _C.linear4_q8_repacked_plan(8, 4096, 512) == ""


def test_repacked_bad_input():
    K = 1024  # one whole panel a row: every SIMD path has a repacked kernel
    _, packed, state = make(1, 4, K, 64)
    out = torch.empty(_C.linear4_q8_repacked_bytes(4, K, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        _C.linear4_q8_repacked_bytes(4, 1000, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        _C.linear4_q8_repack(packed.data_ptr(), packed.numel(), 4, K, 8, out.data_ptr(), out.numel(), 1)
    with pytest.raises(ValueError, match="out has"):
        _C.linear4_q8_repack(packed.data_ptr(), packed.numel(), 4, K, 64, out.data_ptr(), out.numel() - 1, 1)
    with pytest.raises(ValueError, match="packed has"):
        _C.linear4_q8_repack(packed.data_ptr(), packed.numel() - 2, 4, K, 64, out.data_ptr(), out.numel(), 1)
    with pytest.raises(ValueError, match="overlap"):
        _C.linear4_q8_repack(packed.data_ptr(), packed.numel(), 4, K, 64, packed.data_ptr(), out.numel(), 1)
    x, y, code8 = torch.randn(1, K), torch.empty(1, 4), formats.int8_codebook("nf4")
    for isa in native_paths():
        with on_path("cpu", isa):
            assert _C.linear4_q8_repacked_fits(4, K, 64) == (isa != "scalar"), isa
            if isa == "scalar":
                continue
            with pytest.raises(ValueError, match="repacked has"):
                _C.linear4_q8_forward_repacked(x.data_ptr(), 1, K, K, out.data_ptr(), out.numel() + 64,
                                               state.absmax.data_ptr(), state.absmax.numel(), code8.data_ptr(), 4, 64,
                                               0, 0, y.data_ptr(), 4, 1)
            with pytest.raises(ValueError, match="absmax has"):
                _C.linear4_q8_forward_repacked(x.data_ptr(), 1, K, K, out.data_ptr(), out.numel(),
                                               state.absmax.data_ptr(), 3, code8.data_ptr(), 4, 64, 0, 0,
                                               y.data_ptr(), 4, 1)


def test_int8_repack_switch_frees_and_remakes_the_copy():
    from qlora_kernels import functional

    x, packed, state = make(1, 12, 1024, 64)
    general = reference.linear_4bit_int8(x, packed, state.absmax, 64, "nf4", 12, None)
    w = functional.prepare_4bit(packed, state)
    try:
        assert functional.int8_repack() is True
        qk.linear_4bit(x, w, compute="int8")
        assert w.has_int8_copy() == _C.linear4_q8_repacked_fits(12, 1024, 64)
        assert functional.int8_repack(False) is False
        y = qk.linear_4bit(x, w, compute="int8")  # the general kernel: the op's bits
        assert not w.has_int8_copy()  # freed at the weight's next call
        assert torch.equal(y, torch.ops.qlora_kernels.linear_4bit_int8(x, packed, state.absmax, 64, "nf4", 12, None))
        assert_int8_close(y, general, magnitude(x, packed, state), 1024, "repack off")
        functional.int8_repack(True)
        qk.linear_4bit(x, w, compute="int8")
        assert w.has_int8_copy() == _C.linear4_q8_repacked_fits(12, 1024, 64)
        # Without a prepared weight there is nothing to keep a copy in: the general kernel.
        y = qk.linear_4bit(x, packed, state, compute="int8")
        assert torch.equal(y, torch.ops.qlora_kernels.linear_4bit_int8(x, packed, state.absmax, 64, "nf4", 12, None))
        with pytest.raises(TypeError, match="enabled must be a bool"):
            functional.int8_repack(1)
    finally:
        functional.int8_repack(True)


def test_int8_repack_env_var_starts_it_off():
    import subprocess
    import sys

    code = "from qlora_kernels import functional; print(functional.int8_repack())"
    env = {**__import__("os").environ, "QLORA_KERNELS_INT8_REPACK": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
