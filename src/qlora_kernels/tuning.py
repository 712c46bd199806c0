"""Per-machine calibration of the CPU kernels' tuning (csrc/tuning.h).

The cache blocking of the many-row loop nest (kc, nc, mc), the row counts up to which the
streaming GEMV beats decoding panels, and on AVX2 the GEMV's codebook decoder (byte
shuffle or dword permute) depend on the cache sizes and the shuffle/permute throughput of
the CPU at hand, not only on its ISA: an AVX2 loop tuned on a Zen 5 core is not tuned for
a Zen 2 one. So, as BLIS and oneDNN pick blocking per micro-architecture, the first fused
linear call of a process runs a short calibration (a bounded number of seconds) for the
ISA path in use and the thread count, and keeps the result in a per-machine cache file;
later processes read it.

Every candidate computes the same products, re-blocked or with another kernel: results
stay within the fp32 bound of csrc/linear4.h, and on one machine with one cache file they
are the same from run to run. A candidate replaces the built-in default only when its
median time beats the default's by more than ``MARGIN``, so a noisy machine keeps the
defaults rather than a lucky draw.

The tuning is settled once per process, for the path in use at the first fused call (the
cpu backend checks one flag per call); a path selected later with ``_C.set_isa`` runs its
built-in values unless ``ensure()`` is called again after the switch.

``QLORA_KERNELS_TUNE=0`` skips calibration and the cache (built-in defaults);
``QLORA_KERNELS_CACHE`` moves the cache folder (default ``~/.cache/qlora-kernels``).
``qlora-kernels info`` shows the tuning in use and where it came from.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

from . import _env

CACHE_FILE = "tuning-v1.json"
MARGIN = 0.05  # a candidate must beat the default's median by this fraction (noise on shared machines is ~3%)
BUDGET_S = 6.0  # calibration stops trying candidates after this long (defaults kept for the rest)
ROUNDS = 5  # interleaved rounds per comparison (median over rounds)

# Candidates per field; the default of the path is always among them.
KC = (128, 256, 384, 512)
NC = {"avx2": (256, 512, 1024, 2048), "avx512": (512, 1024, 2048)}
MC = {"avx2": (60, 120, 240), "avx512": (60, 120, 240)}
GEMV_ROWS = (2, 4, 6, 8, 12, 16)

# The calibration problem: SmolLM2-sized layers (the small models people fine-tune on
# CPUs) with the NF4 blocksize 64; M=256 rows for the loop nest, one row for the GEMV.
GEMM_M, GEMM_K, GEMM_N = 256, 1536, 1024
# The GEMV/loop-nest crossover depends on where the weight lives: a weight in L2 makes
# repeated GEMV passes cheap, one from DRAM does not; the GEMV keeps a row count only if it
# wins on both a small (1 MiB) and a large (8 MiB) weight.
GEMV_SHAPES = ((1536, 1536), (4096, 4096))
BLOCKSIZE = 64


@dataclass
class Status:
    isa: str
    threads: int
    values: dict
    source: str  # "defaults (QLORA_KERNELS_TUNE=0)", "calibrated", "cache", ...
    path: str | None = None
    seconds: float | None = None
    measured: dict = field(default_factory=dict)

    def line(self) -> str:
        v = self.values
        text = (f"kc={v['kc']} nc={v['nc']} mc={v['mc']}, GEMV up to {v['gemv_rows_forward']} rows forward / "
                f"{v['gemv_rows_backward']} backward")
        if self.isa == "avx2":
            text += f", GEMV decode {'byte shuffle' if v['gemv_decode'] == 0 else 'dword permute'}"
        where = f" ({self.path})" if self.path else ""
        took = f" in {self.seconds:.1f} s" if self.seconds is not None else ""
        return f"{self.isa}, {self.threads} threads: {text} [{self.source}{took}{where}]"


_lock = threading.Lock()
_status: dict[tuple[str, int], Status] = {}
ready = False  # fast check for the cpu backend: True once the path in use is settled


def enabled() -> bool:
    return _env.switch(_env.TUNE, True)


def _path_of(isa: str) -> str:
    """The tuning slot a path uses (avx512vnni runs the avx512 fp32 kernels)."""
    return "avx512" if isa == "avx512vnni" else isa


def _machine_key(isa: str, threads: int) -> str:
    """What a cached tuning is valid for: this CPU model and flags, the path, the thread
    count, and this very build of the extension (a rebuilt kernel needs new numbers)."""
    from . import _C

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "cache size")):
                    cpu += line
                if line.strip() == "":
                    break
    except OSError:
        import platform

        cpu = platform.processor()
    h = hashlib.sha256(cpu.encode())
    with open(_C.__file__, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return f"{_path_of(isa)}/t{threads}/{h.hexdigest()[:24]}"


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: calibrate again and rewrite it


def _store(path: str, key: str, entry: dict) -> str | None:
    """Adds the entry to the cache file atomically (a reader never sees half a file;
    two processes racing keep one complete file). Returns why it could not, or None."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _load(path)
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tuning-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return None
    except OSError as e:
        return str(e)


def _valid(values, defaults: dict) -> bool:
    return isinstance(values, dict) and set(values) == set(defaults) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in values.values())


def ensure() -> Status:
    """Settles the tuning of the ISA path in use at torch's thread count: from the cache
    file, by calibrating (then caching), or the built-in defaults when disabled (values
    set by hand with ``_C.set_tuning`` are then left alone)."""
    global ready
    import torch

    from . import _C

    isa, threads = _C.get_isa(), torch.get_num_threads()
    key = (_path_of(isa), threads)
    with _lock:
        st = _status.get(key)
        if st is not None:
            if st.values != _C.tuning(isa):
                _C.set_tuning(isa, st.values)  # another thread count's tuning was in use
            ready = True
            return st
        defaults = _C.default_tuning(isa)
        if isa == "scalar":
            st = Status(isa, threads, defaults, "defaults (the scalar path has nothing to tune)")
        elif not enabled():
            st = Status(isa, threads, defaults, f"defaults ({_env.TUNE}=0)")
        else:
            path = os.path.join(str(_env.cache_dir()), CACHE_FILE)
            mkey = _machine_key(isa, threads)
            entry = _load(path).get(mkey)
            if isinstance(entry, dict) and _valid(entry.get("values"), defaults):
                try:
                    _C.set_tuning(isa, entry["values"])
                    st = Status(isa, threads, entry["values"], "cache", path, measured=entry.get("measured", {}))
                except ValueError:
                    st = None  # a value this build no longer takes: calibrate again
            if st is None:
                t0 = time.perf_counter()
                values, measured = calibrate(isa, threads)
                seconds = time.perf_counter() - t0
                why = _store(path, mkey, {"values": values, "measured": measured, "seconds": round(seconds, 2),
                                          "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
                st = Status(isa, threads, values, "calibrated" if why is None else f"calibrated, not cached: {why}",
                            path if why is None else None, seconds, measured)
        _status[key] = st
        ready = True
        return st


def status() -> Status:
    """The tuning of the path in use (settling it first if needed)."""
    return ensure()


# ---- calibration ---------------------------------------------------------------------


class _Problem:
    """Random NF4-shaped operands (valid packed bytes and positive absmax; values do not
    matter for timing) and the raw kernel calls."""

    def __init__(self, M, K, N, threads):
        import torch

        from . import _C, formats

        g = torch.Generator().manual_seed(0)
        self.M, self.K, self.N, self.threads = M, K, N, threads
        self.x = torch.randn(M, K, generator=g)
        self.dy = torch.randn(M, N, generator=g)
        self.packed = torch.randint(0, 256, ((N * K + 1) // 2,), dtype=torch.uint8, generator=g)
        self.absmax = torch.rand(-(-N * K // BLOCKSIZE), generator=g) + 0.5
        self.code = formats.codebook("nf4")
        self.y = torch.empty(M, N)
        self.dx = torch.empty(M, K)
        self._C = _C

    def forward(self, m=None):
        m = self.M if m is None else m
        self._C.linear4_forward(self.x.data_ptr(), m, self.K, self.K, self.packed.data_ptr(), self.packed.numel(),
                                self.absmax.data_ptr(), self.absmax.numel(), self.code.data_ptr(), self.N, BLOCKSIZE,
                                0, 0, self.y.data_ptr(), self.N, self.threads)

    def backward(self, m=None):
        m = self.M if m is None else m
        self._C.linear4_backward_input(self.dy.data_ptr(), m, self.N, self.N, self.packed.data_ptr(),
                                       self.packed.numel(), self.absmax.data_ptr(), self.absmax.numel(),
                                       self.code.data_ptr(), self.K, BLOCKSIZE, self.dx.data_ptr(), self.K,
                                       self.threads)


def _compare(isa: str, base: dict, field_name: str, candidates, run, deadline: float) -> tuple[int, dict]:
    """Times ``run`` under each candidate value of one field (the others as in ``base``),
    in interleaved rounds with a rotating order so that drift hits every candidate alike;
    returns the chosen value and the per-candidate medians (seconds)."""
    from . import _C

    cands = list(dict.fromkeys([base[field_name], *candidates]))
    times: dict[int, list[float]] = {c: [] for c in cands}
    for c in cands:  # warm-up: first touch of scratch and operands
        _C.set_tuning(isa, {**base, field_name: c})
        run()
    for r in range(ROUNDS):
        if time.perf_counter() > deadline and r >= 2:
            break
        order = cands[r % len(cands):] + cands[:r % len(cands)]
        for c in order:
            _C.set_tuning(isa, {**base, field_name: c})
            t0 = time.perf_counter()
            run()
            times[c].append(time.perf_counter() - t0)
    med = {c: statistics.median(v) for c, v in times.items()}
    best = min(med, key=med.get)
    chosen = best if med[best] < (1 - MARGIN) * med[base[field_name]] else base[field_name]
    _C.set_tuning(isa, {**base, field_name: chosen})
    return chosen, {str(c): round(m * 1e6, 1) for c, m in med.items()}


def _crossover(isa: str, base: dict, field_name: str, probs, backward: bool, deadline: float) -> tuple[int, dict]:
    """The largest row count (of GEMV_ROWS) up to which the streaming GEMV is faster than
    the panel loop nest on every problem, both timed in interleaved rounds at each row
    count; stops at the first row count where the loop nest wins on one of them. A row
    count where the two are within MARGIN counts as the default's call, not a move."""
    from . import _C

    default = base[field_name]
    chosen, measured = 1, {}
    for m in GEMV_ROWS:
        if time.perf_counter() > deadline:
            _C.set_tuning(isa, base)
            return default, {**measured, "stopped": "budget"}
        wins = True
        for prob in probs:
            run = functools.partial(prob.backward if backward else prob.forward, m)
            t = {"gemv": [], "gemm": []}
            for r in range(ROUNDS + 1):  # round 0 is the warm-up
                for kind in (("gemv", "gemm") if r % 2 == 0 else ("gemm", "gemv")):
                    _C.set_tuning(isa, {**base, field_name: 16 if kind == "gemv" else 0})
                    t0 = time.perf_counter()
                    run()
                    if r:
                        t[kind].append(time.perf_counter() - t0)
            gemv, gemm = statistics.median(t["gemv"]), statistics.median(t["gemm"])
            measured[f"{m} rows {prob.N}x{prob.K}"] = {"gemv_us": round(gemv * 1e6, 1), "gemm_us": round(gemm * 1e6, 1)}
            tie = abs(gemv - gemm) <= MARGIN * max(gemv, gemm)
            if gemv >= gemm and not (tie and m <= default):
                wins = False
            if gemv < gemm and tie and m > default:
                wins = False
        if not wins:
            break
        chosen = m
    _C.set_tuning(isa, {**base, field_name: chosen})
    return chosen, measured


def calibrate(isa: str, threads: int, budget_s: float = BUDGET_S) -> tuple[dict, dict]:
    """Measures the candidates for the path ``isa`` at ``threads`` threads and returns
    (values, what was measured). Leaves the chosen values set."""
    from . import _C

    path = _path_of(isa)
    deadline = time.perf_counter() + budget_s
    base = _C.default_tuning(isa)
    _C.set_tuning(isa, base)
    measured = {}
    gemm = _Problem(GEMM_M, GEMM_K, GEMM_N, threads)

    def gemm_step():
        gemm.forward()
        gemm.backward()

    for name, cands in (("kc", KC), ("nc", NC[path]), ("mc", MC[path])):
        if time.perf_counter() > deadline:
            measured[name] = "not measured (budget)"
            continue
        base[name], measured[name] = _compare(isa, base, name, cands, gemm_step, deadline)
    gemvs = [_Problem(max(GEMV_ROWS), k, n, threads) for k, n in GEMV_SHAPES]
    if path == "avx2":
        def one_row():
            for p in gemvs:
                p.forward(1)

        base["gemv_decode"], measured["gemv_decode"] = _compare(isa, base, "gemv_decode", (0, 1), one_row, deadline)
    for name, backward in (("gemv_rows_forward", False), ("gemv_rows_backward", True)):
        base[name], measured[name] = _crossover(isa, base, name, gemvs, backward, deadline)
    _C.set_tuning(isa, base)
    return base, measured
