"""Benchmark cases shared by ``qlora-kernels bench`` and the pytest-benchmark suites in
benches/: each case is our kernel or a peer on the same inputs, grouped so that a report
can state ratios measured side by side in one process (harness.py times them); training
steps run each case in a process of its own (train.StepWorker), as a user's training does.

    harness   Case, interleaved timing, per-round ratios, fractions of the machine's peak
    quant     quantize/dequantize cases          linear   fused linear, int8, LoRA layer
    train     training steps (PEFT, bitsandbytes) onnx     ONNX Runtime decoding
    peers     peers' model conversions (the SmolLM2 model: finetune.smollm2)
"""
from __future__ import annotations

from .harness import Case, Span, calls_per_round, group_rows, groups_of, interleave, machine_summary, release, timed
from .quant import quant_cases


def all_cases(quick: bool = False) -> list[Case]:
    """The built-in set: quantization, the fused linear at M=1 and M=512, one QLoRA layer
    forward+backward, and (full run only) a training step on SmolLM2-135M-Instruct."""
    from . import linear as bench_linear

    size = 2048 if quick else 4096
    cases = quant_cases(size, size)
    cases += bench_linear.linear_cases(1, size, size)
    cases += bench_linear.linear_int8_cases(1, size, size)
    cases += bench_linear.linear_cases(512 if not quick else 128, size, size)
    cases += bench_linear.lora_layer_cases(512 if not quick else 128, size, size)
    if not quick:
        from . import train as bench_train

        try:
            cases += [c for c in bench_train.train_cases("smollm2") if "DoRA" not in c.group]
        except (ImportError, OSError) as e:  # the model wheel is optional
            import logging

            logging.getLogger(__name__).warning("training-step benchmark skipped: %s", e)
    return cases


def _stock_bitsandbytes() -> None:
    import os
    import sys

    if "bitsandbytes" not in sys.modules:
        os.environ["QLORA_KERNELS_BNB"] = "0"
        return
    from ..integrations.bitsandbytes import status

    if status()["active"]:
        raise RuntimeError("bench: bitsandbytes, a peer here, was imported with the qlora-kernels plugin active; "
                           "run with QLORA_KERNELS_BNB=0")


def run(quick: bool = False, progress: bool = True, with_peak: bool = True) -> list[dict]:
    """Every group of ``all_cases`` in interleaved rounds; rows as ``group_rows`` gives them.
    The peer bitsandbytes runs stock: our backend plugin is kept out of it."""
    _stock_bitsandbytes()
    peak = None
    if with_peak:
        from .. import peak as _peak

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
        try:
            times = interleave(g, rounds=3 if quick else 7, calls=calls_per_round(g))
        finally:
            release(g)
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
    ax.set_title("qlora-kernels vs peers, same inputs")
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


__all__ = ["Case", "Span", "all_cases", "calls_per_round", "format_table", "group_rows", "groups_of", "interleave",
           "machine_summary", "plot", "quant_cases", "release", "run", "timed"]
