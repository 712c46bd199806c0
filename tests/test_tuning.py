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
import time

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
@pytest.mark.parametrize("variant", range(len(VARIANTS)),
                         ids=lambda i: "-".join(f"{k}{v}" for k, v in VARIANTS[i].items()))
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


def _fake_time(table):
    """A stand-in for tuning._time: seconds per call from ``table(value, reps)`` (value: the
    field's value set in the extension when the batch runs), recording every batch's reps."""
    batches = []

    def fake(run, reps):
        batches.append(reps)
        return table(reps)

    return fake, batches


@pytest.fixture
def avx512_table():
    """The avx512 tuning slot (the extension's on every CPU) restored after the test."""
    before = _C.tuning("avx512")
    yield "avx512"
    _C.set_tuning("avx512", before)


def test_a_sample_is_a_batch_of_calls_at_least_sample_s_long(monkeypatch, avx512_table):
    """One 40 us call is at the mercy of a single scheduler stall: each timed sample is a
    batch of back-to-back calls lasting SAMPLE_S or more (reps from one call's length)."""
    fake, batches = _fake_time(lambda reps: 40e-6)
    monkeypatch.setattr(tuning, "_time", fake)
    base = _C.default_tuning("avx512")
    tuning._compare("avx512", dict(base), "kc", tuning.KC, lambda: None, time.perf_counter() + 60)
    timed = [r for r in batches if r > 1]
    assert timed and all(r * 40e-6 >= tuning.SAMPLE_S for r in timed), batches
    assert tuning._reps(0.1) == 1 and tuning._reps(1e-12) == tuning.MAX_REPS


def _per_value(isa, name, times):
    """A timing table by the value of ``name`` set in the extension: times[value] lists the
    rounds in units of 100 us (so that a sample batches calls), a single call the first."""
    rounds = {v: iter(t * 10) for v, t in times.items()}

    def table(reps):
        v = _C.tuning(isa)[name]
        return 1e-4 * (times[v][0] if reps == 1 else next(rounds[v]))

    return table


@pytest.mark.parametrize("noisy", [False, True])
def test_a_gain_within_the_rounds_spread_keeps_the_default(monkeypatch, avx512_table, noisy):
    """kc=512 20% faster than the default in its best round: taken when the rounds agree;
    when the rest of its rounds are 30% slower than its best (a busy machine), the default
    stays and the result says the field was too noisy to judge."""
    base = _C.default_tuning("avx512")
    fast = [0.8, 1.04, 1.04, 1.04, 1.04] if noisy else [0.8, 0.81, 0.8, 0.82, 0.8]
    times = {v: [1.0] * 5 for v in tuning.KC}
    times[base["kc"]] = [1.0, 1.01, 1.0, 1.02, 1.0]
    times[512] = fast
    fake, _ = _fake_time(_per_value("avx512", "kc", times))
    monkeypatch.setattr(tuning, "_time", fake)
    chosen, measured = tuning._compare("avx512", dict(base), "kc", tuning.KC, lambda: None,
                                       time.perf_counter() + 60)
    assert measured["calls_per_sample"] > 1
    assert chosen == (base["kc"] if noisy else 512), measured
    assert bool(measured.get("noisy")) == noisy and measured["spread"] == pytest.approx(0.3 if noisy else 0.0, abs=1e-3)
    assert _C.tuning("avx512")["kc"] == chosen


class _FakeProblem:
    N = K = 64

    def forward(self, m):
        pass

    backward = forward


def _gemv_or_gemm(isa, name, gemv_rounds, gemm_rounds):
    """Timings by kernel: the field at 16 runs the GEMV, at 0 the loop nest."""
    g, l = iter(gemv_rounds * 1000), iter(gemm_rounds * 1000)
    return lambda reps: next(g) if _C.tuning(isa)[name] == 16 else next(l)


@pytest.mark.parametrize("name", ["gemv_rows_forward", "gemv_rows_backward"])
def test_a_crossover_tied_everywhere_keeps_the_paths_default(monkeypatch, avx512_table, name):
    """The avx512 backward default is 3, not one of GEMV_ROWS: the default's own row count
    is a candidate, so GEMV and loop nest tied at every row count keep it."""
    base = _C.default_tuning("avx512")
    fake, _ = _fake_time(_gemv_or_gemm("avx512", name, [1e-3], [1e-3]))
    monkeypatch.setattr(tuning, "_time", fake)
    chosen, _ = tuning._crossover("avx512", dict(base), name, [_FakeProblem()], name.endswith("backward"),
                                  time.perf_counter() + 60)
    assert chosen == base[name]


def test_a_noisy_crossover_keeps_the_default(monkeypatch, avx512_table):
    """GEMV 3% faster in its best round but its rounds spread 20%: not a difference the
    rounds can tell, so the default row count stays (a single noisy call chose 1, 6 or 2)."""
    base = _C.default_tuning("avx512")
    fake, _ = _fake_time(_gemv_or_gemm("avx512", "gemv_rows_forward", [0.97e-3, 1.2e-3], [1e-3]))
    monkeypatch.setattr(tuning, "_time", fake)
    chosen, measured = tuning._crossover("avx512", dict(base), "gemv_rows_forward", [_FakeProblem()], False,
                                         time.perf_counter() + 60)
    assert chosen == base["gemv_rows_forward"] and measured["noisy"], measured
    # A GEMV four times faster is a win however noisy: every row count goes to the GEMV.
    fake, _ = _fake_time(_gemv_or_gemm("avx512", "gemv_rows_forward", [0.25e-3, 0.3e-3], [1e-3]))
    monkeypatch.setattr(tuning, "_time", fake)
    chosen, measured = tuning._crossover("avx512", dict(base), "gemv_rows_forward", [_FakeProblem()], False,
                                         time.perf_counter() + 60)
    assert chosen == max(tuning.GEMV_ROWS) and "noisy" not in measured


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """tuning.py's process state as at import (no pair settled), tuning on, the cache in
    tmp_path; the extension's tuning tables, its path and torch's threads restored after."""
    monkeypatch.setattr(tuning, "_status", {})
    monkeypatch.setattr(tuning, "ready", tuning._Ready())
    monkeypatch.setenv("QLORA_KERNELS_TUNE", "1")
    monkeypatch.setenv("QLORA_KERNELS_CACHE", str(tmp_path))
    slots = [p for p in _C.compiled_isas() if p in ("avx2", "avx512")]
    before = {p: _C.tuning(p) for p in slots}
    threads, isa = torch.get_num_threads(), _C.get_isa()
    try:
        yield tmp_path
    finally:
        torch.set_num_threads(threads)
        _C.set_isa(isa)
        for p, v in before.items():
            _C.set_tuning(p, v)


def _fused_call():
    x = torch.randn(2, 128)
    p, s = qk.quantize_4bit(torch.randn(64, 128))
    with qk.use_backend("cpu"):
        qk.linear_4bit(x, p, s)


def _no_calibration(*args, **kwargs):
    raise AssertionError("calibrated where the cache holds the tuning")


def _tunable_isa() -> str:
    isa = _C.get_isa()
    if isa == "scalar":
        pytest.skip("the scalar path has nothing to tune")
    return isa


def _cache_holds(fresh, monkeypatch, isa: str, values: dict) -> None:
    """The cache file holds ``values[threads]`` for each thread count; calibrating fails."""
    monkeypatch.setattr(tuning, "calibrate", _no_calibration)
    (fresh / tuning.CACHE_FILE).write_text(
        json.dumps({tuning._machine_key(isa, t): {"values": v} for t, v in values.items()}))


def test_each_thread_count_runs_its_own_tuning_and_status_only_reports(fresh, monkeypatch):
    isa = _tunable_isa()
    d = _C.default_tuning(isa)
    v = {1: {**d, "kc": 128, "gemv_rows_forward": 2}, 2: {**d, "kc": 512, "gemv_rows_forward": 16}}
    _cache_holds(fresh, monkeypatch, isa, v)
    for t in (2, 1, 2):
        torch.set_num_threads(t)
        _fused_call()
        assert _C.tuning(isa) == v[t], f"{t} threads ran another count's tuning"
        assert tuning.status().values == v[t] and tuning.status().source == "cache"
    # status() reports what runs and changes nothing, not even for a count not settled yet.
    torch.set_num_threads(1)
    st = tuning.status()
    assert _C.tuning(isa) == v[2] == st.values and "2-thread" in st.source, st.line()
    _C.set_tuning(isa, {"kc": 64})
    torch.set_num_threads(2)
    st = tuning.status()
    assert st.values["kc"] == 64 == _C.tuning(isa)["kc"] and "set with _C.set_tuning" in st.source


def test_with_tuning_off_values_set_by_hand_stay(fresh, monkeypatch):
    monkeypatch.setenv("QLORA_KERNELS_TUNE", "0")
    isa = _C.get_isa()
    if isa == "scalar":
        pytest.skip("the scalar path has nothing to tune")
    _C.set_tuning(isa, {"kc": 512})
    for t in (2, 1, 2):
        torch.set_num_threads(t)
        _fused_call()
        st = tuning.status()
        assert _C.tuning(isa)["kc"] == 512 == st.values["kc"], "a hand-set value was replaced"
        assert "set with _C.set_tuning" in st.source and "QLORA_KERNELS_TUNE=0" in st.source
    assert not any(fresh.iterdir())


def test_tuning_turned_off_after_another_thread_count_runs_the_defaults(fresh, monkeypatch):
    # The 1-thread pair settled as "defaults (QLORA_KERNELS_TUNE=0)" while the slot kept the
    # 2-thread tuning, which status() then called values set by hand.
    isa = _tunable_isa()
    d = _C.default_tuning(isa)
    v2 = {**d, "kc": 512, "gemv_rows_forward": 16}
    _cache_holds(fresh, monkeypatch, isa, {2: v2})
    torch.set_num_threads(2)
    _fused_call()
    assert _C.tuning(isa) == v2
    monkeypatch.setenv("QLORA_KERNELS_TUNE", "0")
    for t in (1, 2, 1):  # the 2-thread pair stays settled (tuned) and is set again in between
        torch.set_num_threads(t)
        _fused_call()
        assert _C.tuning(isa) == (v2 if t == 2 else d), t
        assert tuning.status().source == ("cache" if t == 2 else "defaults (QLORA_KERNELS_TUNE=0)"), t


def test_a_damaged_noisy_note_in_the_cache_is_ignored(fresh):
    # {"noisy": true} (a hand-edited file) made every fused call raise TypeError in the note
    isa = _tunable_isa()
    d = _C.default_tuning(isa)
    mkey = tuning._machine_key(isa, torch.get_num_threads())
    (fresh / tuning.CACHE_FILE).write_text(json.dumps({mkey: {"values": d, "measured": {"noisy": True}}}))
    _fused_call()
    _fused_call()
    assert tuning.status().source == "cache" and tuning.status().note == ""


def test_a_cached_value_beyond_int64_is_recalibrated_not_an_error(fresh, monkeypatch):
    """kc=2**70 fails in the binding's int64 cast (RuntimeError, not set_tuning's
    ValueError): it made every fused call raise, for good. Now the entry is measured again,
    and a calibration a busy machine left at the defaults says so."""
    isa = _C.get_isa()
    if isa == "scalar":
        pytest.skip("the scalar path has nothing to tune")
    d = _C.default_tuning(isa)
    assert not tuning._valid({**d, "kc": 2**70}, d) and tuning._valid(d, d)
    mkey = tuning._machine_key(isa, torch.get_num_threads())
    (fresh / tuning.CACHE_FILE).write_text(json.dumps({mkey: {"values": {**d, "kc": 2**70}}}))
    monkeypatch.setattr(tuning, "calibrate", lambda isa, threads: (dict(d), {"noisy": ["kc"]}))
    _fused_call()
    st = tuning.status()
    assert st.source == "calibrated" and "too busy to measure kc" in st.line(), st.line()
    assert json.loads((fresh / tuning.CACHE_FILE).read_text())[mkey]["values"] == d
    tuning._status.clear()
    tuning.ready.settled.clear()
    assert tuning.ensure().source == "cache" and "too busy" in tuning.status().note


def test_a_failed_cache_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / tuning.CACHE_FILE).mkdir()  # the final rename fails
    why = tuning._store(str(tmp_path / tuning.CACHE_FILE), "k", {"values": {}})
    assert why and sorted(p.name for p in tmp_path.iterdir()) == [tuning.CACHE_FILE]


RACE = ("import json, os, sys, time\n"
        "from qlora_kernels import _C, tuning\n"
        "kc, sync = int(sys.argv[1]), sys.argv[2]\n"
        "def calibrate(isa, threads):\n"  # slow, and its own answer per process
        "    time.sleep(1.5)\n"
        "    v = {**_C.default_tuning(isa), 'kc': kc}\n"
        "    _C.set_tuning(isa, v)\n"
        "    return v, {}\n"
        "tuning.calibrate = calibrate\n"
        "open(os.path.join(sync, str(kc)), 'w').close()\n"
        "while len(os.listdir(sync)) < 2:\n"  # both start settling at once
        "    time.sleep(0.01)\n"
        "st = tuning.ensure()\n"
        "print(json.dumps({'source': st.source, 'kc': _C.tuning(_C.get_isa())['kc']}))\n")


def test_concurrent_first_calibrations_agree(tmp_path):
    """Two ranks of one job calibrating at once took their own tunings (different bits)
    and the cache kept the last writer: they take turns on a lock file, and the second
    adopts the first's entry."""
    if _C.get_isa() == "scalar":
        pytest.skip("the scalar path has nothing to tune")
    cache, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "QLORA_KERNELS_TUNE": "1", "QLORA_KERNELS_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(kc), str(sync)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for kc in (128, 512)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    got = [json.loads(o.splitlines()[-1]) for o, _ in outs]
    assert got[0]["kc"] == got[1]["kc"], got
    assert sorted(g["source"] for g in got) == ["cache", "calibrated"], got
    (entry,) = json.loads((cache / tuning.CACHE_FILE).read_text()).values()
    assert entry["values"]["kc"] == got[0]["kc"]


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


def test_a_winner_is_confirmed_head_to_head_before_it_is_taken(monkeypatch, avx512_table):
    """A busy spell slowed every round of the default (fastest round 50% over the others):
    nc=256 was taken and cached for good, and on the quiet machine it gained nothing. The
    winner now meets the default once more; a gain that does not hold keeps the default."""
    base = _C.default_tuning("avx512")
    times = {v: [1.0] * 10 for v in tuning.NC["avx512"]}
    times[base["nc"]] = [1.5] * 5 + [1.0] * 5  # the comparison's rounds disturbed, the confirmation's not
    fake, _ = _fake_time(_per_value("avx512", "nc", times))
    monkeypatch.setattr(tuning, "_time", fake)
    chosen, measured = tuning._compare("avx512", dict(base), "nc", tuning.NC["avx512"], lambda: None,
                                       time.perf_counter() + 60)
    assert chosen == base["nc"] and measured["noisy"] and "confirm" in measured, measured
