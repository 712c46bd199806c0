"""The timing harness of every benchmark (``qlora-kernels bench`` and benches/): a case is
our kernel or a peer on the same inputs; the cases of a group are timed in interleaved
rounds and reported as per-round ratios with their spread and fractions of the machine's
measured limits."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


class Span(float):
    """What a case's fn returns when it times a part of the work it runs (the output head +
    loss inside a whole training step): that part's seconds, which ``timed`` takes instead of
    the call's wall time."""


@dataclass
class Case:
    group: str             # cases in one group share inputs and are compared with each other
    name: str              # "qlora-kernels" or the peer's name
    fn: Callable[[], object]
    ours: bool
    work: Optional[float] = None   # elements (or flops) per call, for a throughput column
    unit: str = ""
    extra: dict = field(default_factory=dict)


def interleave(cases: list[Case], rounds: int = 7, calls: int = 1) -> dict[str, list[float]]:
    """Per-call seconds of every case of one group, timed in interleaved rounds: each round
    times every case once (``calls`` back-to-back calls), the order rotating from round to
    round (A B C, B C A, C A B, ...). A shared machine's drift then lands on all cases of a
    round alike, and the per-round ratios (``group_rows``) cancel it; a sequential run of
    one case after another drifted by up to 40% between rows.

    Short calls (``calls`` > 1) are timed after an untimed batch of the same case: timed
    right after another implementation, a ~0.25 ms call paid for its predecessor (its
    weights out of cache, the OpenMP threads of torch and ours still spinning beside ONNX
    Runtime's pool), and the rotation puts the same predecessor before a case in most
    rounds: ONNX Runtime's one-row int8 product took 0.30-0.32 ms after torch's or ours and
    0.27 ms after itself, ours 0.27-0.28 ms either way (AMD EPYC Zen 5, AVX2 code, 2
    threads, 25 shuffled rounds; docs/benchmarks.md)."""
    for c in cases:  # warm-up: first-call allocations, thread pools, lazily built sessions
        c.fn()
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    n = len(cases)
    for r in range(rounds):
        for c in cases[r % n:] + cases[:r % n]:
            times[c.name].append(timed(c.fn, calls))
    return times


def release(cases: list[Case]) -> None:
    """Ends what a group's cases hold past the group: the processes of cases that run in one
    of their own (train.StepWorker)."""
    for c in cases:
        close = getattr(c.fn, "close", None)
        if callable(close):
            close()


def timed(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``calls`` back-to-back calls of fn; short calls (``calls`` > 1)
    after an untimed batch of the same calls (why: ``interleave``). Where every call returns
    a ``Span``, the spans' seconds instead of the wall time."""
    for _ in range(calls if calls > 1 else 0):
        fn()
    spans, every = 0.0, True
    t0 = time.perf_counter()
    for _ in range(calls):
        r = fn()
        if isinstance(r, Span):
            spans += r
        else:
            every = False
    wall = time.perf_counter() - t0
    return (spans if every else wall) / calls


def _spread(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)
    return statistics.median(v), v[0], v[-1]


def group_rows(cases: list[Case], times: dict[str, list[float]], peak=None) -> list[dict]:
    """One row per case: median time with its spread (min, max over the rounds), throughput,
    the fraction of this machine's limit (``peak.Peak``: a GEMM's GFLOP/s over the FMA peak
    of the CPU path, a streaming kernel's bytes/s over the bandwidth of the level its bytes
    live in), and for each peer the ratio our time / its time taken round by round (median
    and spread; < 1: we are faster)."""
    ours = next((c for c in cases if c.ours), None)
    rows = []
    for c in cases:
        med, lo, hi = _spread(times[c.name])
        row = {"group": c.group, "name": c.name, "ours": c.ours, "median_s": med, "min_s": lo, "max_s": hi,
               "unit": c.unit, "rounds": len(times[c.name])}
        row["throughput"] = (c.work / med / (1e9 if c.unit.startswith("G") else 1.0)) if c.work else None
        if peak is not None:
            row.update(limit_fraction(c, med, peak))
        if ours is not None and not c.ours:
            per_round = [a / b for a, b in zip(times[ours.name], times[c.name])]
            row["ratio"], row["ratio_min"], row["ratio_max"] = _spread(per_round)
        rows.append(row)
    return rows


def limit_fraction(c: Case, seconds: float, peak) -> dict:
    """The fraction of the machine's limit this case reached: bytes streamed per call over
    the bandwidth of the level they live in (cases that say how many bytes they stream),
    else flops over the FMA peak of the CPU path in use (ours) or of the widest path (a
    peer's library picks its own)."""
    threads = c.extra.get("threads")
    if threads and threads != peak.threads:  # a case on another thread count: that count's limits
        from ..peak import measure

        peak = measure(threads)
    nbytes = c.extra.get("stream_bytes")
    if nbytes:
        from ..peak import stream_fraction

        fraction, level = stream_fraction(nbytes, seconds, peak)
        return {"fraction": fraction, "limit": f"{level} bandwidth"}
    if c.unit == "GFLOP/s" and c.work:
        from .. import _C

        isa = _C.get_isa() if c.ours else max(peak.fma_gflops, key=peak.fma_gflops.get)
        p = peak.fma_gflops.get(isa)
        if p:
            return {"fraction": c.work / seconds * 1e-9 / p, "limit": f"{isa} FMA peak"}
    return {}


def groups_of(cases: list[Case]) -> list[list[Case]]:
    """Cases grouped (in first-seen order) by the inputs they share."""
    out: dict[str, list[Case]] = {}
    for c in cases:
        out.setdefault(c.group, []).append(c)
    return list(out.values())


def calls_per_round(group: list[Case]) -> int:
    """~0.1 ms calls run 20 times back to back per round, so that every implementation is
    timed warm (single calls timed ORT's thread pool waking up, not its kernel)."""
    return 20 if group[0].group.startswith("linear M=1 ") else 1


def machine_summary() -> str:
    from .. import _C

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
            f"CPU path {_C.get_isa()} (supported: {', '.join(_C.supported_isas())}); "
            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
            + ("; bitsandbytes held to its AVX2 kernels (benches/bnb_isa.py)"
               if os.environ.get("QLORA_KERNELS_BENCH_BNB_AVX2") == "1" else "")
            + ("; cpuid masked to an AVX2-only CPU for every library (scripts/masked_cpu.sh)"
               if "cpuid_mask" in os.environ.get("LD_PRELOAD", "") else ""))
