"""Per-machine tuning of the CPU kernels (csrc/tuning.h, qlora_kernels/tuning.py): every
tuning value keeps the fused and dense linears within the fp32 bound of the reference on
every path this CPU runs; the values reach the kernels; calibration is bounded, cached per
machine and skipped by QLORA_KERNELS_TUNE=0; `info` shows the choice."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _C, tuning
from qlora_kernels.backends import run

from .conftest import kernel_paths, on_path
from .test_linear import EPS32, assert_within, dot_bound, make_weight

FAST_PATHS = [p for p in kernel_paths() if p != "scalar"]

# Extremes and odd values of every field (mc=7 is not a multiple of any MR; kc=64 and
# nc=64 are the smallest blocks; gemv rows 0 = never, 16 = always for these sizes).
VARIANTS = [
    {"kc": 64, "nc": 64, "mc": 7},
    {"kc": 1024, "nc": 4096, "mc": 2048},
    {"kc": 192, "nc": 320, "mc": 1, "gemv_rows_forward": 0, "gemv_rows_backward": 0},
    {"kc": 128, "gemv_rows_forward": 16, "gemv_rows_backward": 16, "gemv_decode": 1},
    {"gemv_rows_forward": 16, "gemv_rows_backward": 16, "gemv_decode": 0},
]
SHAPES = [(1, 64, 64), (7, 4097, 33), (17, 130, 129), (300, 700, 200), (13, 1, 5)]  # (M, K, N)


@pytest.fixture(autouse=True, scope="module")
def settled():
    """The suite runs with QLORA_KERNELS_TUNE=0 (conftest); settling first means no first
    fused call inside a test below replaces the values it set."""
    tuning.ensure()


@contextlib.contextmanager
def tuned(isa, values):
    """The path's tuning set to values for the block, the previous tuning restored after."""
    before = _C.tuning(isa)
    _C.set_tuning(isa, values)
    try:
        yield
    finally:
        _C.set_tuning(isa, before)


@pytest.mark.parametrize("isa", FAST_PATHS)
@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=lambda i: "-".join(f"{k}{v}" for k, v in VARIANTS[i].items()))
def test_every_tuning_stays_within_the_bound(isa, variant):
    with on_path("cpu", isa), tuned(isa, VARIANTS[variant]):
        for M, K, N in SHAPES:
            for quant_type, blocksize in (("nf4", 64), ("fp4", 128)):
                packed, state, Wd = make_weight(N, K, quant_type, blocksize, seed=M + K + N)
                x = torch.randn(M, K, requires_grad=True)
                b = torch.randn(N)
                y = qk.linear_4bit(x, packed, state, b)
                ref = x.detach() @ Wd.t() + b
                bound = dot_bound(x.detach(), Wd) + 2 * EPS32 * ref.abs().double()
                assert_within(y.detach(), ref, bound, f"forward {M}x{K}->{N} {quant_type}")
                dy = torch.randn(M, N)
                y.backward(dy)
                assert_within(x.grad, dy @ Wd, dot_bound(dy, Wd.t()), f"input grad {M}x{K}->{N}")
            # The dense fp32 linear (the fused head) shares the loop nest and its blocking.
            W = torch.randn(N, K)
            x2 = torch.randn(M, K)
            y2 = run("linear_dense", x2, W, None)
            assert_within(y2, x2 @ W.t(), dot_bound(x2, W), f"dense {M}x{K}->{N}")
            dy2 = torch.randn(M, N)
            dx2 = run("linear_dense_grad_input", dy2, W)
            assert_within(dx2, dy2 @ W, dot_bound(dy2, W.t()), f"dense grad {M}x{K}->{N}")


@pytest.mark.parametrize("isa", FAST_PATHS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_backward_panels_on_half_chunk_boundaries_decode_exactly(isa, threads):
    """The backward GEMM splits its output columns (the weight's K) between threads and
    panels in units of 32, so panels start and end half-way through the dword decoder's
    64-element chunks (576 = 288 + 288). With dy the identity, dx is the dequantized
    weight itself: every element, whichever decoder handled it, exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with on_path("cpu", isa), tuned(isa, {"nc": 64, "kc": 64, "gemv_rows_backward": 0}):
            for K, blocksize, quant_type in ((576, 64, "nf4"), (192, 32, "fp4"), (320, 128, "nf4"), (96, 32, "nf4")):
                N = 40
                packed, state, Wd = make_weight(N, K, quant_type, blocksize, seed=K + blocksize)
                dx = torch.ops.qlora_kernels.linear_4bit_grad_input(torch.eye(N), packed, state.absmax, blocksize,
                                                                    quant_type, K)
                assert torch.equal(dx, Wd), f"K={K} blocksize={blocksize}: {(dx != Wd).sum().item()} elements differ"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("isa", FAST_PATHS)
def test_the_values_reach_the_kernels(isa):
    """Not only accepted: the GEMV crossover and decoder change the plan, and the blocking
    changes the loop nest's scratch (sized by kc x nc per thread)."""
    with on_path("cpu", isa):
        with tuned(isa, {"gemv_rows_forward": 0, "gemv_rows_backward": 0}):
            assert _C.linear4_plan(1, 256, 256, 64) == "gemm"
            assert _C.linear4_plan(1, 256, 256, 64, True) == "gemm"
        with tuned(isa, {"gemv_rows_forward": 16, "gemv_rows_backward": 16}):
            assert _C.linear4_plan(16, 256, 256, 64).startswith("gemv")
            assert _C.linear4_plan(16, 256, 256, 64, True).startswith("gemv")
            assert _C.linear4_plan(17, 256, 256, 64) == "gemm"
        if isa == "avx2":
            with tuned(isa, {"gemv_decode": 0}):
                assert _C.linear4_plan(1, 256, 256, 64) == "gemv-shuf"
            with tuned(isa, {"gemv_decode": 1}):
                assert _C.linear4_plan(1, 256, 256, 64) == "gemv"
        packed, state, _ = make_weight(1024, 1024)
        x = torch.randn(64, 1024)
        scratch = {}
        for kc, nc in ((64, 64), (1024, 1024)):
            with tuned(isa, {"kc": kc, "nc": nc, "gemv_rows_forward": 0}):
                _C.linear4_reset_peak_scratch()
                qk.linear_4bit(x, packed, state)
                scratch[kc] = _C.linear4_peak_scratch_bytes()
        # One thread's B panel alone is kc * nc floats: 16 KiB against 4 MiB.
        assert scratch[64] < 200_000 < 4 * 1024 * 1024 <= scratch[1024], scratch


def test_bad_values_are_refused_naming_the_field():
    isa = _C.get_isa()
    before = _C.tuning(isa)
    for values, words in (({"kc": 100}, "kc=100"), ({"kc": 2048}, "kc=2048"), ({"nc": 0}, "nc=0"),
                          ({"mc": 0}, "mc=0"), ({"gemv_rows_forward": 17}, "gemv_rows_forward=17"),
                          ({"gemv_decode": 2}, "gemv_decode=2"), ({"kq": 64}, "unknown field 'kq'"),
                          ({"kc": 64.0}, "kc must be an int"), ({"nc": True}, "nc must be an int")):
        with pytest.raises(ValueError, match=words):
            _C.set_tuning(isa, values)
        assert _C.tuning(isa) == before, "a refused call must change nothing"
    with pytest.raises(ValueError, match="unknown ISA path 'avx3'"):
        _C.tuning("avx3")


def test_avx512vnni_shares_the_avx512_tuning():
    # the table is the extension's, whatever this CPU runs: no skip on CPUs without the path
    with tuned("avx512", {"kc": 192}):
        assert _C.tuning("avx512vnni")["kc"] == 192


def test_calibration_is_bounded_and_returns_valid_values():
    isa = _C.get_isa()
    if isa == "scalar":
        pytest.skip("the scalar path has nothing to tune")
    before = _C.tuning(isa)
    try:
        # A zero budget still measures the first field (two rounds) and keeps the defaults
        # for everything the budget did not reach.
        values, measured = tuning.calibrate(isa, torch.get_num_threads(), budget_s=0.0)
        defaults = _C.default_tuning(isa)
        assert set(values) == set(defaults)
        _C.set_tuning(isa, values)  # valid by the extension's own checks
        for name in ("nc", "mc"):
            assert values[name] == defaults[name] and "budget" in measured[name]
    finally:
        _C.set_tuning(isa, before)


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)


STATUS = ("import json, torch, qlora_kernels as qk\n"
          "from qlora_kernels import tuning\n"
          "x = torch.randn(3, 128); p, s = qk.quantize_4bit(torch.randn(64, 128))\n"
          "qk.linear_4bit(x, p, s)\n"  # the first fused call settles the tuning
          "st = tuning.status(); print(json.dumps({'source': st.source, 'values': st.values, 'path': st.path}))\n")


def test_first_use_calibrates_caches_and_later_processes_read_the_cache(tmp_path):
    if _C.get_isa() == "scalar":
        pytest.skip("the scalar path has nothing to tune")
    env = {"QLORA_KERNELS_TUNE": "1", "QLORA_KERNELS_CACHE": str(tmp_path)}
    first = _run(STATUS, env)
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout.splitlines()[-1])
    assert a["source"] == "calibrated" and a["path"] == str(tmp_path / tuning.CACHE_FILE)
    cached = json.loads((tmp_path / tuning.CACHE_FILE).read_text())
    (entry,) = cached.values()
    assert entry["values"] == a["values"] and entry["measured"]
    second = _run(STATUS, env)
    b = json.loads(second.stdout.splitlines()[-1])
    assert b["source"] == "cache" and b["values"] == a["values"]
    # Another thread count is another entry: the blocking that suits 2 threads may not suit 1.
    third = _run("import torch; torch.set_num_threads(1)\n" + STATUS, env)
    assert json.loads(third.stdout.splitlines()[-1])["source"] == "calibrated"
    assert len(json.loads((tmp_path / tuning.CACHE_FILE).read_text())) == 2
    # A damaged cache file is recalibrated and rewritten, never an error.
    (tmp_path / tuning.CACHE_FILE).write_text("{not json")
    fourth = _run(STATUS, env)
    assert json.loads(fourth.stdout.splitlines()[-1])["source"] == "calibrated", fourth.stderr
    json.loads((tmp_path / tuning.CACHE_FILE).read_text())


def test_tune_0_skips_calibration_and_the_cache(tmp_path):
    out = _run(STATUS, {"QLORA_KERNELS_TUNE": "0", "QLORA_KERNELS_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout.splitlines()[-1])
    assert st["values"] == _C.default_tuning(_C.get_isa())
    assert not any(tmp_path.iterdir()), "QLORA_KERNELS_TUNE=0 must not write a cache"


def test_an_unwritable_cache_folder_still_tunes(tmp_path):
    if _C.get_isa() == "scalar":
        pytest.skip("the scalar path has nothing to tune")
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache folder should be
    out = _run(STATUS, {"QLORA_KERNELS_TUNE": "1", "QLORA_KERNELS_CACHE": str(blocker / "sub")})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["source"].startswith("calibrated, not cached")


def test_bad_tune_value_is_refused_naming_the_variable():
    out = _run("import qlora_kernels", {"QLORA_KERNELS_TUNE": "yes"})
    assert out.returncode != 0 and "QLORA_KERNELS_TUNE='yes'" in out.stderr


def test_info_shows_the_tuning(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qlora_kernels.cli", "info"], capture_output=True, text=True,
                         env={**os.environ, "QLORA_KERNELS_TUNE": "0", "QLORA_KERNELS_CACHE": str(tmp_path)},
                         timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("tuning:"))
    d = _C.default_tuning(_C.get_isa())
    if _C.get_isa() != "scalar":
        assert f"kc={d['kc']} nc={d['nc']} mc={d['mc']}" in line and "QLORA_KERNELS_TUNE=0" in line
