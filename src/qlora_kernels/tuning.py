"""Per-machine calibration of the CPU kernels' tuning (csrc/tuning.h).

The cache blocking of the many-row loop nest (kc, nc, mc), the row counts up to which the
streaming GEMV beats decoding panels, and on AVX2 the GEMV's codebook decoder (byte
shuffle or dword permute) depend on the cache sizes and the shuffle/permute throughput of
the CPU at hand, not only on its ISA: an AVX2 loop tuned on a Zen 5 core is not tuned for
a Zen 2 one. So, as BLIS and oneDNN pick blocking per micro-architecture, the first fused
linear call of a process at a given ISA path and thread count runs a short calibration (a
bounded number of seconds) for that path and thread count, and keeps the result in a
per-machine cache file; later processes read it.

Every candidate computes the same products, re-blocked or with another kernel: results
stay within the fp32 bound of csrc/linear4.h, and on one machine with one cache file they
are the same from run to run. A sample times a batch of calls of at least ``SAMPLE_S``
(one call of a small problem is shorter than one scheduler stall of a shared machine);
a candidate's time is its fastest sample over interleaved rounds, and it replaces the
built-in default only when that beats the default's by more than ``MARGIN``. Where the
rounds spread wider than ``MARGIN`` and than the difference being judged (a busy machine),
the field keeps its default and the status says so: a noisy machine keeps the defaults
rather than a lucky draw.

Processes calibrating at once (the ranks of a torchrun job) take turns on a lock file in the
cache folder; a process that waited adopts the entry stored meanwhile, so all of them run
the same tuning (and compute the same bits).

The tuning is settled per (ISA path, thread count): the cpu backend checks ``ready`` per
call, which is false again after ``torch.set_num_threads`` or ``_C.set_isa`` moves to a pair
not settled in the extension, so the next fused call settles (or restores) that pair.

``QLORA_KERNELS_TUNE=0`` skips calibration and the cache: the built-in defaults, and values
set by hand with ``_C.set_tuning`` stay as set. ``QLORA_KERNELS_CACHE`` moves the cache
folder (default ``$XDG_CACHE_HOME/qlora-kernels``, else ``~/.cache/qlora-kernels``).
``qlora-kernels info`` shows the tuning in use and where it came from.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

from . import _env

try:
    import fcntl
except ImportError:  # not POSIX: concurrent first calibrations are then not serialized
    fcntl = None

CACHE_FILE = "tuning-v1.json"
LOCK_FILE = "tuning-v1.lock"  # held around read -> calibrate -> store, so racing processes agree
MARGIN = 0.05  # a candidate must beat the default by this fraction (and by more than the rounds' spread)
BUDGET_S = 6.0  # calibration stops trying candidates after this long (defaults kept for the rest)
ROUNDS = 5  # interleaved rounds per comparison
SAMPLE_S = 0.002  # a sample is a batch of calls this long at least: a lone 40 us call is at the mercy of one stall
MAX_REPS = 500  # calls per sample at most (a call too short to time is not what the tuning is for)
LOCK_WAIT_S = 60.0  # another process's calibration takes BUDGET_S and a little; longer means it is stuck

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
    applied: bool = False  # ensure() set these values in the extension (so it may set them again)
    note: str = ""  # e.g. the fields a busy machine left at their defaults

    def line(self) -> str:
        v = self.values
        text = (f"kc={v['kc']} nc={v['nc']} mc={v['mc']}, GEMV up to {v['gemv_rows_forward']} rows forward / "
                f"{v['gemv_rows_backward']} backward")
        if self.isa == "avx2":
            text += f", GEMV decode {'byte shuffle' if v['gemv_decode'] == 0 else 'dword permute'}"
        where = f" ({self.path})" if self.path else ""
        took = f" in {self.seconds:.1f} s" if self.seconds is not None else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.isa}, {self.threads} threads: {text} [{self.source}{took}{where}{note}]"


class _Ready:
    """``tuning.ready``, the cpu backend's per-call check (``if not tuning.ready``): true
    while the extension holds the settled tuning of the ISA path and thread count in use.
    A thread count or path changed since makes it false, so the next fused call settles
    that pair (a bool set once would keep running the other pair's values)."""

    __slots__ = ("settled", "isa", "threads")

    def __init__(self):
        self.settled: dict[str, int] = {}  # ISA name -> thread count whose tuning its slot holds
        self.isa = self.threads = None  # _C.get_isa and torch.get_num_threads, bound by ensure()

    def __bool__(self) -> bool:
        s = self.settled
        return bool(s) and s.get(self.isa()) == self.threads()


_lock = threading.Lock()
_status: dict[tuple[str, int], Status] = {}
ready = _Ready()


def enabled() -> bool:
    return _env.switch(_env.TUNE, True)


def _path_of(isa: str) -> str:
    """The tuning slot a path uses (avx512vnni runs the avx512 fp32 kernels)."""
    return "avx512" if isa == "avx512vnni" else isa


def _isas_of(path: str) -> tuple[str, ...]:
    """The ISA names sharing the tuning slot ``path``."""
    return ("avx512", "avx512vnni") if path == "avx512" else (path,)


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
    """Adds the entry to the cache file atomically (a reader never sees half a file).
    Returns why it could not, or None; a failed write leaves no temporary file behind."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _load(path)
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tuning-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        tmp = None
        return None
    except OSError as e:
        return str(e)
    finally:
        if tmp is not None:  # every write that failed would otherwise leave one more in the folder
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def _file_lock(folder: str):
    """Holds LOCK_FILE in ``folder`` exclusively (waiting at most LOCK_WAIT_S); yields
    whether it is held. Without it (no fcntl, an unwritable folder, a file system without
    locks, a holder stuck) the caller goes on unlocked: a lock must never stop a process."""
    fd = None
    held = False
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                os.makedirs(folder, exist_ok=True)
                fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        if fd is not None:
            give_up = time.monotonic() + LOCK_WAIT_S
            while not held:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                except BlockingIOError:
                    if time.monotonic() > give_up:
                        break
                    time.sleep(0.05)
                except OSError:
                    break
        yield held
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _valid(values, defaults: dict) -> bool:
    """The fields of this build, each an int the extension's int64 fields can hold (a larger
    one fails in pybind11's cast with a RuntimeError, not set_tuning's ValueError); the
    ranges are the extension's to judge (set_tuning)."""
    return isinstance(values, dict) and set(values) == set(defaults) and all(
        isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63 for v in values.values())


def _noisy_note(measured: dict) -> str:
    noisy = measured.get("noisy") if isinstance(measured, dict) else None
    # a hand-edited cache file may hold anything here; the note is only a note
    if not noisy or not isinstance(noisy, (list, tuple)):
        return ""
    return f"machine too busy to measure {', '.join(map(str, noisy))}: defaults kept"


def _adopt(isa: str, threads: int, entry, defaults: dict, path: str) -> Status | None:
    """Sets a cached entry's values and returns its status; None when the entry is missing
    or not one this build takes (the caller calibrates again)."""
    from . import _C

    if not isinstance(entry, dict) or not _valid(entry.get("values"), defaults):
        return None
    try:
        _C.set_tuning(isa, entry["values"])
    except (ValueError, TypeError, OverflowError, RuntimeError):
        return None  # a value this build no longer takes (a refused call changes nothing)
    measured = entry.get("measured")
    measured = measured if isinstance(measured, dict) else {}
    note = _noisy_note(measured)
    return Status(isa, threads, dict(entry["values"]), "cache", path, measured=measured, applied=True,
                  note=note + " (delete the file to measure again)" if note else "")


def _settle(isa: str, threads: int) -> Status:
    """The tuning of (isa, threads) from the cache file, by calibrating (then caching), or
    the built-in defaults when disabled, which then sets nothing."""
    from . import _C

    defaults = _C.default_tuning(isa)
    if isa == "scalar":
        return Status(isa, threads, defaults, "defaults (the scalar path has nothing to tune)")
    if not enabled():
        return Status(isa, threads, defaults, f"defaults ({_env.TUNE}=0)")
    folder = str(_env.cache_dir())
    path = os.path.join(folder, CACHE_FILE)
    mkey = _machine_key(isa, threads)
    st = _adopt(isa, threads, _load(path).get(mkey), defaults, path)  # the usual case: no lock needed
    if st is not None:
        return st
    with _file_lock(folder):
        # Another process (a rank of the same job) may have calibrated while this one waited:
        # its entry is adopted, so that every process runs the same tuning.
        st = _adopt(isa, threads, _load(path).get(mkey), defaults, path)
        if st is not None:
            return st
        t0 = time.perf_counter()
        values, measured = calibrate(isa, threads)
        seconds = time.perf_counter() - t0
        why = _store(path, mkey, {"values": values, "measured": measured, "seconds": round(seconds, 2),
                                  "when": time.strftime("%Y-%m-%dT%H:%M:%S")})
    source = "calibrated" if why is None else f"calibrated, not cached: {why}"
    return Status(isa, threads, values, source, path if why is None else None, seconds, measured, applied=True,
                  note=_noisy_note(measured))


def ensure() -> Status:
    """Settles the tuning of the ISA path in use at torch's thread count (once per pair and
    process; a pair settled before is set again when another pair's values are in its
    slot). With tuning off, values set by hand with ``_C.set_tuning`` stay; another thread
    count's tuning left in the slot is replaced by the defaults."""
    import torch

    from . import _C

    isa, threads = _C.get_isa(), torch.get_num_threads()
    path = _path_of(isa)
    with _lock:
        ready.isa, ready.threads = _C.get_isa, torch.get_num_threads
        st = _status.get((path, threads))
        if st is None:
            st = _status[(path, threads)] = _settle(isa, threads)
        elif st.applied and ready.settled.get(isa) != threads:
            _C.set_tuning(isa, st.values)  # the slot holds another thread count's tuning
        if not st.applied and ready.settled.get(isa) not in (None, threads):
            # Tuning turned off after another thread count's was applied: its values are still
            # in the slot and would run here as if set by hand. Values set by hand stay.
            prev = _status.get((path, ready.settled[isa]))
            if prev is not None and prev.applied and _C.tuning(isa) == prev.values:
                _C.set_tuning(isa, _C.default_tuning(isa))
        for name in _isas_of(path):
            ready.settled[name] = threads
        return st


def status() -> Status:
    """What the extension runs for the ISA path in use at torch's thread count, and where
    it came from. Read-only: it neither calibrates nor sets values (``ensure`` does)."""
    import torch

    from . import _C

    isa, threads = _C.get_isa(), torch.get_num_threads()
    values = _C.tuning(isa)
    st = _status.get((_path_of(isa), threads))
    if st is not None and values == st.values:
        return replace(st, isa=isa)
    other = ready.settled.get(isa)
    held = _status.get((_path_of(isa), other)) if other is not None else None
    if held is not None and held.applied and held.values == values and other != threads:
        return Status(isa, threads, values, f"the {other}-thread tuning, until a fused call settles {threads} threads")
    if st is None and values == _C.default_tuning(isa):
        return Status(isa, threads, values, "defaults, not settled yet (the first fused call settles them)")
    return Status(isa, threads, values, "set with _C.set_tuning" + (f" (settled: {st.source})" if st else ""))


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


def _time(run, reps: int) -> float:
    """Seconds per call of ``reps`` back-to-back calls of run (the tests replace it with
    made-up timings to check the decisions)."""
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - t0) / reps


def _reps(one_call_s: float) -> int:
    """Calls per sample for a sample of at least SAMPLE_S."""
    return max(1, min(MAX_REPS, math.ceil(SAMPLE_S / max(one_call_s, 1e-9))))


def _warm_reps(isa: str, settings: list, run) -> int:
    """Runs ``run`` once under each tuning (the first touch of scratch and operands), then
    times one call under each: the calls per sample, from the fastest."""
    from . import _C

    one = []
    for values in settings:
        _C.set_tuning(isa, values)
        run()
        one.append(_time(run, 1))
    return _reps(min(one))


def _judge(samples: list[float]) -> tuple[float, float]:
    """(fastest round, spread): the fastest is the least disturbed by other work; the spread
    is how far the median round is above it (a fraction). A difference smaller than the
    spread is not one the rounds can tell apart."""
    s = sorted(samples)
    return s[0], s[len(s) // 2] / s[0] - 1


def _compare(isa: str, base: dict, field_name: str, candidates, run, deadline: float) -> tuple[int, dict]:
    """Times ``run`` under each candidate value of one field (the others as in ``base``),
    in interleaved rounds with a rotating order so that drift hits every candidate alike;
    returns the chosen value and what was measured (fastest round per candidate in us, the
    spread, and ``noisy`` when a gain beyond MARGIN was within the spread: default kept)."""
    from . import _C

    default = base[field_name]
    cands = list(dict.fromkeys([default, *candidates]))
    reps = _warm_reps(isa, [{**base, field_name: c} for c in cands], run)
    times: dict[int, list[float]] = {c: [] for c in cands}
    for r in range(ROUNDS):
        if time.perf_counter() > deadline and r >= 2:
            break
        order = cands[r % len(cands):] + cands[:r % len(cands)]
        for c in order:
            _C.set_tuning(isa, {**base, field_name: c})
            times[c].append(_time(run, reps))
    judged = {c: _judge(v) for c, v in times.items()}
    best = min(cands, key=lambda c: judged[c][0])
    spread = max(judged[default][1], judged[best][1])
    gain = 1 - judged[best][0] / judged[default][0]
    measured = {str(c): round(judged[c][0] * 1e6, 1) for c in cands}
    measured.update(spread=round(spread, 3), calls_per_sample=reps)
    chosen = default
    if gain > MARGIN:
        if gain > spread and _confirmed(isa, base, field_name, default, best, run, reps, measured):
            chosen = best
        else:
            measured["noisy"] = True
    _C.set_tuning(isa, {**base, field_name: chosen})
    return chosen, measured


def _confirmed(isa: str, base: dict, field_name: str, default: int, best: int, run, reps: int,
               measured: dict) -> bool:
    """The winner against the default once more, head to head in alternating order: a busy
    spell that slowed every round of the default (seen on a shared host: nc=256 taken for a
    33% "gain" whose rerun on the quiet machine was none) must not be cached for good."""
    from . import _C

    times: dict[int, list[float]] = {default: [], best: []}
    for r in range(ROUNDS):
        for c in ((default, best) if r % 2 == 0 else (best, default)):
            _C.set_tuning(isa, {**base, field_name: c})
            times[c].append(_time(run, reps))
    judged = {c: _judge(v) for c, v in times.items()}
    gain = 1 - judged[best][0] / judged[default][0]
    measured["confirm"] = {str(c): round(judged[c][0] * 1e6, 1) for c in (default, best)}
    return gain > MARGIN and gain > max(judged[default][1], judged[best][1])


def _crossover(isa: str, base: dict, field_name: str, probs, backward: bool, deadline: float) -> tuple[int, dict]:
    """The largest row count (of GEMV_ROWS and the path's default) up to which the streaming
    GEMV is faster than the panel loop nest on every problem, both timed in interleaved
    rounds at each row count; stops at the first row count where the loop nest wins on one
    of them. A row count where the two are within MARGIN counts as the default's call, not
    a move; one where the rounds spread wider than MARGIN and than the difference keeps the
    default for the field (``noisy``)."""
    from . import _C

    default = base[field_name]
    measured: dict = {}

    def done(value):
        _C.set_tuning(isa, {**base, field_name: value})
        return value, measured

    chosen = 1
    for m in sorted({r for r in (*GEMV_ROWS, default) if r > 1}):  # the default itself: a tie can keep it
        if time.perf_counter() > deadline:
            measured["stopped"] = "budget"
            return done(default)
        wins = True
        for prob in probs:
            run = functools.partial(prob.backward if backward else prob.forward, m)
            reps = _warm_reps(isa, [{**base, field_name: v} for v in (16, 0)], run)  # the GEMV, then the loop nest
            t: dict[str, list[float]] = {"gemv": [], "gemm": []}
            for r in range(ROUNDS):
                for kind in (("gemv", "gemm") if r % 2 == 0 else ("gemm", "gemv")):
                    _C.set_tuning(isa, {**base, field_name: 16 if kind == "gemv" else 0})
                    t[kind].append(_time(run, reps))
            (gemv, gemv_spread), (gemm, gemm_spread) = _judge(t["gemv"]), _judge(t["gemm"])
            spread = max(gemv_spread, gemm_spread)
            measured[f"{m} rows {prob.N}x{prob.K}"] = {"gemv_us": round(gemv * 1e6, 1),
                                                       "gemm_us": round(gemm * 1e6, 1), "spread": round(spread, 3)}
            diff = abs(gemv - gemm) / max(gemv, gemm)
            if diff <= spread and spread > MARGIN:
                measured["noisy"] = True
                return done(default)
            tie = diff <= MARGIN
            if gemv >= gemm and not (tie and m <= default):
                wins = False
            if gemv < gemm and tie and m > default:
                wins = False
        if not wins:
            break
        chosen = m
    return done(chosen)


def calibrate(isa: str, threads: int, budget_s: float = BUDGET_S) -> tuple[dict, dict]:
    """Measures the candidates for the path ``isa`` at ``threads`` threads and returns
    (values, what was measured; its ``noisy`` lists the fields whose rounds spread too
    wide to judge, which keep their defaults). Leaves the chosen values set."""
    from . import _C

    path = _path_of(isa)
    deadline = time.perf_counter() + budget_s
    base = _C.default_tuning(isa)
    _C.set_tuning(isa, base)
    measured: dict = {}
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
    noisy = [name for name, m in measured.items() if isinstance(m, dict) and m.get("noisy")]
    if noisy:
        measured["noisy"] = noisy
    _C.set_tuning(isa, base)
    return base, measured
