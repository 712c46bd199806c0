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


def interleave(cases: list[Case], rounds: int = 7, calls: int = 1) -> dict[str, list[float]]:
    """Per-call seconds of every case of one group, timed in interleaved rounds: each round
    times every case once (``calls`` back-to-back calls), the order rotating from round to
    round (A B C, B C A, C A B, ...). A shared machine's drift then lands on all cases of a
    round alike, and the per-round ratios (``group_rows``) cancel it; a sequential run of
    one case after another drifted by up to 40% between rows."""
    for c in cases:  # warm-up: first-call allocations, thread pools, lazily built sessions
        c.fn()
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    n = len(cases)
    for r in range(rounds):
        for c in cases[r % n:] + cases[:r % n]:
            t0 = time.perf_counter()
            for _ in range(calls):
                c.fn()
            times[c.name].append((time.perf_counter() - t0) / calls)
    return times


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
            row.update(_fraction(c, med, peak))
        if ours is not None and not c.ours:
            per_round = [a / b for a, b in zip(times[ours.name], times[c.name])]
            row["ratio"], row["ratio_min"], row["ratio_max"] = _spread(per_round)
        rows.append(row)
    return rows


def _fraction(c: Case, seconds: float, peak) -> dict:
    """The fraction of the machine's limit this case reached: bytes streamed per call over
    the bandwidth of the level they live in (cases that say how many bytes they stream),
    else flops over the FMA peak of the CPU path in use (ours) or of the widest path (a
    peer's library picks its own)."""
    nbytes = c.extra.get("stream_bytes")
    if nbytes:
        level = peak.level_of(nbytes)
        return {"fraction": nbytes / seconds * 1e-9 / peak.bandwidth_gbs[level], "limit": f"{level} bandwidth"}
    if c.unit == "GFLOP/s" and c.work:
        from . import _C

        isa = _C.get_isa() if c.ours else max(peak.fma_gflops, key=peak.fma_gflops.get)
        p = peak.fma_gflops.get(isa)
        if p:
            return {"fraction": c.work / seconds * 1e-9 / p, "limit": f"{isa} FMA peak"}
    return {}


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


def all_cases(quick: bool = False) -> list[Case]:
    """The built-in set: quantization, the fused linear at M=1 and M=512, one QLoRA layer
    forward+backward, and (full run only) a training step on SmolLM2-135M-Instruct."""
    from . import bench_linear

    size = 2048 if quick else 4096
    cases = quant_cases(size, size)
    cases += bench_linear.linear_cases(1, size, size)
    cases += bench_linear.linear_int8_cases(1, size, size)
    cases += bench_linear.linear_cases(512 if not quick else 128, size, size)
    cases += bench_linear.lora_layer_cases(512 if not quick else 128, size, size)
    if not quick:
        from . import bench_train

        try:
            cases += [c for c in bench_train.train_cases("smollm2") if "DoRA" not in c.group]
        except (ImportError, OSError) as e:  # the model wheel is optional
            import logging

            logging.getLogger(__name__).warning("training-step benchmark skipped: %s", e)
    return cases


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


def run(quick: bool = False, progress: bool = True, with_peak: bool = True) -> list[dict]:
    """Every group of ``all_cases`` in interleaved rounds; rows as ``group_rows`` gives them."""
    peak = None
    if with_peak:
        from . import peak as _peak

        peak = _peak.measure(seconds=0.05 if quick else 0.1)
    groups = groups_of(all_cases(quick))
    it = groups
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(groups, desc="bench", unit="group")
        except ImportError:
            pass
    rows = []
    for g in it:
        times = interleave(g, rounds=3 if quick else 7, calls=calls_per_round(g))
        rows += group_rows(g, times, peak)
    return rows


def plot(rows: list[dict], path: str) -> None:
    """A bar chart of our speedup over each peer (log scale; 1 = parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = [r for r in rows if r.get("ratio")]
    labels = [f"{r['group']}\nvs {r['name']}" for r in peers]
    vals = [1.0 / r["ratio"] for r in peers]
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(peers) + 1.5))
    ax.barh(range(len(vals)), vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(vals)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("our speedup (peer time / our time), log scale")
    ax.set_title("qlora-kernels vs peers, same inputs, same process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    """Markdown: per case the median time [min-max over the interleaved rounds], throughput,
    fraction of the machine's limit, and our time / its time per round (median [min-max];
    < 1: ours is faster)."""
    lines = ["| group | implementation | median ms [min-max] | throughput | of machine limit | ours / it, per round |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        t = f"{r['median_s'] * 1e3:.2f} [{r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f}]"
        tp = f"{r['throughput']:.2f} {r.get('unit', '')}" if r.get("throughput") else ""
        frac = f"{100 * r['fraction']:.0f}% {r['limit']}" if r.get("fraction") else ""
        ratio = f"{r['ratio']:.2f}x [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]" if r.get("ratio") else ""
        lines.append(f"| {r['group']} | {r['name']} | {t} | {tp} | {frac} | {ratio} |")
    return "\n".join(lines)
