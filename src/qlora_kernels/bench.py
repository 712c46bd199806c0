"""Benchmark cases shared by ``qlora-kernels bench`` and the pytest-benchmark suites in
benches/: each case is our kernel or a peer on the same inputs, grouped so that a report
can state ratios measured side by side in one process."""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import functional


@dataclass
class Case:
    group: str             # cases in one group share inputs and are compared with each other
    name: str              # "qlora-kernels" or the peer's name
    fn: Callable[[], object]
    ours: bool
    work: Optional[float] = None   # elements (or flops) per call, for a throughput column
    unit: str = ""
    extra: dict = field(default_factory=dict)


def _bnb():
    try:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as F

        return F
    except Exception:  # a peer that is not installed is simply not compared
        return None


def quant_cases(rows: int = 4096, cols: int = 4096, quant_type: str = "nf4", blocksize: int = 64) -> list[Case]:
    W = torch.randn(rows, cols)
    n = W.numel()
    shape = f"{rows}x{cols} {quant_type} bs{blocksize}"
    packed, state = functional.quantize_4bit(W, quant_type, blocksize)
    out = torch.empty(rows, cols)
    cases = [
        Case(f"quantize_4bit {shape}", "qlora-kernels", lambda: functional.quantize_4bit(W, quant_type, blocksize),
             True, n, "Gelem/s"),
        Case(f"dequantize_4bit {shape} -> fp32", "qlora-kernels", lambda: functional.dequantize_4bit(packed, state),
             True, n, "Gelem/s"),
        Case(f"dequantize_4bit {shape} -> fp32", "qlora-kernels (out=)",
             lambda: functional.dequantize_4bit(packed, state, out=out), True, n, "Gelem/s"),
    ]
    F = _bnb()
    if F is not None:
        qb, sb = F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type)
        cases += [
            Case(f"quantize_4bit {shape}", "bitsandbytes",
                 lambda: F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type), False, n, "Gelem/s"),
            Case(f"dequantize_4bit {shape} -> fp32", "bitsandbytes", lambda: F.dequantize_4bit(qb, sb), False, n,
                 "Gelem/s"),
        ]
    return cases


def time_call(fn: Callable[[], object], min_rounds: int = 5, min_seconds: float = 0.5) -> list[float]:
    """Wall times of repeated calls after one warm-up; at least ``min_rounds`` calls and
    ``min_seconds`` in total."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_rounds or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return times


def machine_summary() -> str:
    from . import _C

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
            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")


def ratio_rows(results: dict[tuple[str, str], float], ours_flags: dict[tuple[str, str], bool]) -> list[dict]:
    """For each group: each entry's median, and ours-vs-peer speedups (peer time / our time)."""
    rows = []
    groups = sorted({g for g, _ in results})
    for g in groups:
        entries = {name: t for (gg, name), t in results.items() if gg == g}
        ours = {n: t for n, t in entries.items() if ours_flags[(g, n)]}
        best_ours = min(ours.values()) if ours else None
        for name, t in entries.items():
            rows.append({
                "group": g, "name": name, "median_s": t,
                "speedup_vs_this": (t / best_ours) if (best_ours and not ours_flags[(g, name)]) else None,
            })
    return rows


def run(quick: bool = False) -> list[dict]:
    size = 2048 if quick else 4096
    cases = quant_cases(size, size)
    results, flags, work = {}, {}, {}
    for c in cases:
        ts = time_call(c.fn, min_rounds=3 if quick else 7, min_seconds=0.2 if quick else 1.0)
        results[(c.group, c.name)] = statistics.median(ts)
        flags[(c.group, c.name)] = c.ours
        work[(c.group, c.name)] = c.work
    rows = ratio_rows(results, flags)
    for r in rows:
        w = work[(r["group"], r["name"])]
        r["throughput"] = (w / r["median_s"] / 1e9) if w else None
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| group | implementation | median ms | G elem/s | our speedup vs it |", "|---|---|---:|---:|---:|"]
    for r in rows:
        sp = f"{r['speedup_vs_this']:.1f}x" if r["speedup_vs_this"] else ""
        tp = f"{r['throughput']:.2f}" if r.get("throughput") else ""
        lines.append(f"| {r['group']} | {r['name']} | {r['median_s'] * 1e3:.2f} | {tp} | {sp} |")
    return "\n".join(lines)
