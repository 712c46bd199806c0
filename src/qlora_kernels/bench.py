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


def run(quick: bool = False, progress: bool = True) -> list[dict]:
    cases = all_cases(quick)
    results, flags, work, units = {}, {}, {}, {}
    it = cases
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(cases, desc="bench", unit="case")
        except ImportError:
            pass
    for c in it:
        ts = time_call(c.fn, min_rounds=3 if quick else 5, min_seconds=0.2 if quick else 1.0)
        results[(c.group, c.name)] = statistics.median(ts)
        flags[(c.group, c.name)] = c.ours
        work[(c.group, c.name)] = c.work
        units[(c.group, c.name)] = c.unit
    rows = ratio_rows(results, flags)
    for r in rows:
        key = (r["group"], r["name"])
        w, unit = work[key], units[key]
        r["unit"] = unit
        r["throughput"] = (w / r["median_s"] / (1e9 if unit.startswith("G") else 1.0)) if w else None
    return rows


def plot(rows: list[dict], path: str) -> None:
    """A bar chart of our speedup over each peer (log scale; 1 = parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = [r for r in rows if r["speedup_vs_this"]]
    labels = [f"{r['group']}\nvs {r['name']}" for r in peers]
    vals = [r["speedup_vs_this"] for r in peers]
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
    lines = ["| group | implementation | median ms | throughput | our speedup vs it |", "|---|---|---:|---:|---:|"]
    for r in rows:
        sp = f"{r['speedup_vs_this']:.2f}x" if r["speedup_vs_this"] else ""
        tp = f"{r['throughput']:.2f} {r.get('unit', '')}" if r.get("throughput") else ""
        lines.append(f"| {r['group']} | {r['name']} | {r['median_s'] * 1e3:.2f} | {tp} | {sp} |")
    return "\n".join(lines)
