"""The RTL decode datapath (hls/rtl/), simulated cycle by cycle with Verilator against the
reference backend, and synthesized for UltraScale+ with Yosys. Needs verilator and yosys
(scripts/setup.sh installs both); a missing tool fails, never skips."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import formats
from qlora_kernels.backends import run
from qlora_kernels.fpga import kernels as fpga_kernels
from qlora_kernels.fpga import rtl
from qlora_kernels.fpga.params import DESIGN

# This checkout's RTL and header: the package may be installed elsewhere (a wheel in a venv).
HLS = Path(__file__).resolve().parents[1] / "hls"
RTL = HLS / "rtl"
LANES = DESIGN.decode_lanes
LATENCY = 9  # codebook lookup + qk_fmul's eight stages (hls/rtl/qk_decode_unit.v)


@pytest.fixture(scope="module")
def decode_exe(tmp_path_factory):
    return rtl.build_decode(tmp_path_factory.mktemp("verilator"), d=RTL)


@pytest.fixture(scope="module")
def fp_exe(tmp_path_factory):
    return rtl.build_fp(tmp_path_factory.mktemp("verilator-fp"), d=RTL)


def _operands(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs that meet every path of an fp32 adder and multiplier: specials, subnormals,
    exact cancellations, near-cancellations (same exponent, a few ulps apart), ties of the
    alignment (exponents 24-26 apart), carries into the next exponent, overflow."""
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.17549435e-38, -1.17549421e-38,
                         3.4028235e38, -3.4028235e38, 1.0, -1.0, 2.0**-126 * 1.5], dtype=np.float32)
    snan = np.array([0x7FA00001, 0xFF800123], dtype=np.uint32).view(np.float32)
    sp = np.concatenate([specials, snan])
    a_sp, b_sp = np.meshgrid(sp, sp)
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    rand = bits.view(np.float32)
    sub = (rng.integers(1, 2**23, n).astype(np.uint32) | (rng.integers(0, 2, n).astype(np.uint32) << 31)).view(
        np.float32)
    near = rand * np.float32(-1)
    near_ulps = (rand.view(np.uint32) + rng.integers(-3, 4, n).astype(np.uint32)).view(np.float32)
    m = (1 + rng.integers(0, 2**23, n) * 2.0**-23)
    e = rng.integers(-40, 40, n)
    x = (m * 2.0**e).astype(np.float32)
    y = (rng.choice([1, -1], n) * (1 + rng.integers(0, 8, n) * 2.0**-23) * 2.0**(e - rng.integers(22, 27, n))).astype(
        np.float32)
    big = (rng.random(n) * 2 + 1).astype(np.float32) * np.float32(2.0**127)
    a = np.concatenate([a_sp.ravel(), rand, sub, rand, rand, x, big, sub])
    b = np.concatenate([b_sp.ravel(), rand[::-1], sub[::-1], near, near_ulps * -1, y, big, rand])
    return a, b


def test_fp_adder_and_multiplier_are_bit_exact_with_the_cpu(fp_exe):
    """qk_fadd and qk_fmul against numpy's float32 add and multiply (the CPU's SSE/AVX
    instructions, round to nearest even, no flush to zero), every pair bit for bit."""
    with np.errstate(all="ignore"):  # the operands include NaNs and overflows on purpose
        a, b = _operands(np.random.default_rng(4), 4000)
    s, p = rtl.run_fp(fp_exe, a, b)
    with np.errstate(all="ignore"):
        ws, wp = a + b, a * b
    for name, got, want in (("add", s, ws), ("mul", p, wp)):
        bad = np.nonzero(_bits(got) != _bits(want))[0]
        assert bad.size == 0, [(name, hex(a.view(np.uint32)[i]), hex(b.view(np.uint32)[i]),
                                hex(_bits(got)[i]), hex(_bits(want)[i])) for i in bad[:4]]


def test_rtl_parameters_are_generated_from_the_hls_header():
    header = (HLS / "qk_hls_params.h").read_text()
    assert (RTL / "qk_params.vh").read_text() == rtl.params_vh(header), \
        "hls/rtl/qk_params.vh is stale: regenerate it with qlora_kernels.fpga.rtl.params_vh()"
    changed = header.replace("#define QK_DECODE_LANES 16", "#define QK_DECODE_LANES 32")
    assert "`define QK_DECODE_LANES 32" in rtl.params_vh(changed)
    top = (RTL / "qk_decode_top.v").read_text()
    assert "`include \"qk_params.vh\"" in top and "parameter LANES = `QK_DECODE_LANES" in top


def _golden(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, n: int) -> np.ndarray:
    with qk.use_backend("reference"):
        out = run("dequantize_4bit", packed, absmax, blocksize, quant_type, [n], torch.float32)
    return out.numpy()


def _case(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, n: int) -> rtl.DecodeCase:
    """The feeder's view: the code bytes padded to whole beats (the padding decodes to
    values the host drops), one absmax per block."""
    beats = -(-n // LANES)
    codes = np.zeros(beats * LANES // 2, dtype=np.uint8)
    codes[:packed.numel()] = packed.numpy().reshape(-1)
    return rtl.DecodeCase(formats.codebook(quant_type).numpy(), codes, absmax.numpy().astype(np.float32),
                          blocksize // LANES)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_decode_is_bit_exact_with_the_reference(decode_exe, quant_type):
    g = torch.Generator().manual_seed(1)
    cases, golden = [], []
    for blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        n = 3 * blocksize - 7  # not a multiple of the beat nor of the block
        packed = torch.randint(0, 256, (formats.packed_numel(n),), dtype=torch.uint8, generator=g)
        nb = formats.num_blocks(n, blocksize)
        absmax = torch.rand(nb, generator=g) * 4
        absmax[0] = 0.0  # a zero block: signed zeros (negative codes give -0.0)
        if nb > 2:
            absmax[2] = 1e-39  # subnormal absmax: subnormal products, rounded
        cases.append(_case(packed, absmax, blocksize, quant_type, n))
        golden.append(_golden(packed, absmax, blocksize, quant_type, n))
    for c, want, out in zip(cases, golden, rtl.run_decode(decode_exe, cases, LANES)):
        got = out.values[:len(want)]
        assert np.array_equal(_bits(got), _bits(want)), f"blocksize {c.beats_per_block * LANES}"


def test_every_codebook_entry_and_tie_is_rounded_as_the_cpu_does(decode_exe):
    """Every nibble against absmax values that make ties (odd significands times a power
    of two past the precision), subnormal, overflowing and special products; golden: the
    CPU's own fp32 multiply (numpy), operand order code * absmax as the reference."""
    rng = np.random.default_rng(2)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.17549435e-38, 3.4028235e38,
                         -3.4028235e38, 1.0, -1.0, 1.5, 0.75, 2.0**-126 * 1.5, 2.0**127], dtype=np.float32)
    nan_payload = np.array([0x7FA00001, 0xFF800123], dtype=np.uint32).view(np.float32)  # signalling NaNs
    codebooks = [specials,
                 np.concatenate([nan_payload, specials[:14]]),
                 (1 + rng.integers(1, 2**23, 16) * 2.0**-23).astype(np.float32),  # odd significands
                 rng.standard_normal(16).astype(np.float32) * np.float32(2.0**-120),
                 formats.codebook("nf4").numpy(), formats.codebook("fp4").numpy()]
    for cb in codebooks:
        beats = 256
        codes = rng.integers(0, 256, beats * LANES // 2, dtype=np.uint8)
        codes[:8] = np.arange(0, 256, 0x11, dtype=np.uint8)[:8]  # every nibble early
        pieces = [specials, (1 + rng.integers(1, 2**23, 64) * 2.0**-23) * 2.0**-140,  # subnormal ties
                  rng.standard_normal(64) * 2.0**rng.integers(-150, 128, 64), rng.random(beats) * 4]
        absmax = np.concatenate(pieces).astype(np.float32)[:beats]
        case = rtl.DecodeCase(cb, codes, absmax, 1)
        (out,) = rtl.run_decode(decode_exe, [case], LANES)
        nib = np.stack([codes >> 4, codes & 15], axis=1).reshape(-1)
        with np.errstate(all="ignore"):
            want = cb[nib] * np.repeat(absmax, LANES)
        assert np.array_equal(_bits(out.values), _bits(want)), \
            np.nonzero(_bits(out.values) != _bits(want))[0][:5]


def test_one_beat_per_cycle_and_the_latency_the_model_assumes(decode_exe):
    """II = QK_II (one beat of QK_DECODE_LANES values per cycle, with a new block's absmax
    taken without a bubble) and a fill latency below the fp32 operator depth the model
    budgets (kernels.GEMV_DEPTH)."""
    g = torch.Generator().manual_seed(3)
    for blocksize, beats in ((32, 1), (32, 500), (64, 333), (4096, 1024)):
        n = beats * LANES
        packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=g)
        absmax = torch.rand(formats.num_blocks(n, blocksize), generator=g)
        (out,) = rtl.run_decode(decode_exe, [_case(packed, absmax, blocksize, "nf4", n)], LANES)
        assert out.latency == LATENCY
        assert out.cycles == beats * DESIGN.ii + LATENCY, (blocksize, beats, out.cycles)
    assert LATENCY < fpga_kernels.GEMV_DEPTH


def test_yosys_maps_a_decode_lane_onto_ultrascale_plus_primitives():
    cells = rtl.synth_cells("qk_decode_unit", {"LANES": 1}, d=RTL)
    # the 24x24 significand product on DSP48E2 slices, logic in LUTs, pipeline in flip-flops
    assert cells.get("DSP48E2", 0) >= 2, cells
    assert any(k.startswith("LUT") for k in cells) and any(k.startswith("FD") for k in cells), cells


# ---- the GEMV compute unit (hls/rtl/qk_gemv_unit.v) at a small configuration -------------------
GEMV_LANES, GEMV_GROUP = 64, 16  # 4 slots per beat, as QK_LANES / QK_GROUP_MIN at full size


@pytest.fixture(scope="module")
def gemv_exe(tmp_path_factory):
    return rtl.build_gemv(tmp_path_factory.mktemp("verilator-gemv"), GEMV_LANES, GEMV_GROUP, d=RTL)


def _device_layout(packed: torch.Tensor, absmax: torch.Tensor, N: int, K: int, blocksize: int):
    """The host's view, as hls/host does it for the HLS engine: K padded to whole tiles of
    LANES columns (codes 0 there, x = 0), beats tile-major then row, one absmax per slot
    (the absmax of the block holding the slot's first column; padding slots take 1.0)."""
    tiles = -(-K // GEMV_LANES)
    Kp = tiles * GEMV_LANES
    nib = np.zeros((N, Kp), dtype=np.uint8)
    flat = packed.numpy().reshape(-1)
    hi, lo = flat >> 4, flat & 15
    allnib = np.stack([hi, lo], axis=1).reshape(-1)[:N * K]
    nib[:, :K] = allnib.reshape(N, K)
    beats_codes, beats_scales = [], []
    slots = GEMV_LANES // GEMV_GROUP
    for t in range(tiles):
        for n in range(N):
            seg = nib[n, t * GEMV_LANES:(t + 1) * GEMV_LANES]
            beats_codes.append((seg[0::2] << 4) | seg[1::2])
            sc = []
            for s in range(slots):
                col = t * GEMV_LANES + s * GEMV_GROUP
                sc.append(absmax[(n * K + col) // blocksize].item() if col < K else 1.0)
            beats_scales.append(sc)
    return np.array(beats_codes, dtype=np.uint8), np.array(beats_scales, dtype=np.float32), tiles


@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
@pytest.mark.parametrize("N,K,blocksize", [(8, 64, 32), (9, 96, 32), (33, 128, 64), (12, 384, 128)],
                         ids=["8x64-bs32", "9x96-bs32-padded", "33x128-bs64", "12x384-bs128"])
def test_gemv_unit_is_within_the_fp32_bound_of_the_reference(gemv_exe, quant_type, N, K, blocksize):
    g = torch.Generator().manual_seed(N * K + blocksize)
    W = torch.randn(N, K, generator=g) * 0.1
    packed, state = qk.quantize_4bit(W, quant_type, blocksize)
    with qk.use_backend("reference"):
        Wd = qk.dequantize_4bit(packed, state)
    x = torch.randn(K, generator=g)
    codes, scales, tiles = _device_layout(packed, state.absmax, N, K, blocksize)
    xp = np.zeros(tiles * GEMV_LANES, dtype=np.float32)
    xp[:K] = x.numpy()
    y, cycles = rtl.run_gemv(gemv_exe, formats.codebook(quant_type).numpy(), xp, codes, scales, N, GEMV_LANES)
    ref = (x.double() @ Wd.double().t()).numpy()
    # the fp32 dot-product bound, plus one rounding per term for applying absmax after the sum
    bound = (K + 4) * 2.0**-24 * (x.abs().double() @ Wd.abs().double().t()).numpy() + 1e-30
    assert np.all(np.abs(y.astype(np.float64) - ref) <= bound), np.max(np.abs(y - ref) - bound)
    # one beat per cycle: every beat streamed back to back, then the pipeline's depth
    assert cycles == tiles * N + rtl.gemv_latency(GEMV_LANES, GEMV_GROUP)


def test_gemv_unit_latency_against_the_model():
    """The full-size unit's pipeline depth (QK_LANES, QK_GROUP_MIN) beside the depth the
    cycle model budgets for the HLS engine (kernels.GEMV_DEPTH)."""
    depth = rtl.gemv_latency(DESIGN.lanes, DESIGN.group_min)
    assert depth == 1 + 8 + 6 * 5 + 8 + 6 * 2 + 7 == 66
    assert abs(depth - fpga_kernels.GEMV_DEPTH) <= 10  # measured 66 vs assumed 60 (docs/fpga.md)
