"""What a run leaves behind and prints: metrics.json (configuration, versions, backend,
per-step losses, held-out before/after, samples, throughput, peak memory), the loss-curve
PNG, and the console lines. Every file is written atomically."""
from __future__ import annotations

import io
import platform
import textwrap
from pathlib import Path

from .checkpoint import atomic_json, atomic_write

METRICS = "metrics.json"
PLOT = "loss.png"


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("qlora-kernels", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["torch_threads"] = torch.get_num_threads()
    return out


def backend_info(name: str) -> dict:
    info = {"backend": name}
    if name == "cpu":
        from .. import _C

        info["cpu_path"] = _C.get_isa()
        info["openmp"] = bool(_C.openmp())
    return info


def metrics(cfg: dict, state: dict, after: dict, samples_after: list, extra: dict) -> dict:
    losses = state["losses"]
    before = state["eval_before"]["loss"]
    return {
        "config": cfg,
        "versions": versions(),
        "backend": backend_info(cfg["backend"]),
        **extra,
        "heldout": {"before": state["eval_before"], "after": after, "delta": after["loss"] - before},
        "train": {
            "steps": state["step"],
            "tokens": state["tokens_trained"],
            "seconds": round(state["train_seconds"], 3),
            "tokens_per_second": state["tokens_trained"] / max(1e-9, state["train_seconds"]),
            "first_loss": losses[0]["loss"] if losses else None,
            "last_loss": losses[-1]["loss"] if losses else None,
        },
        "peak_rss_mb": round(state.get("peak_rss_kb", 0) / 1024, 1),
        "resumed_from_steps": state.get("resumed_from", []),
        "samples": {"before": state.get("samples_before", []), "after": samples_after},
        "losses": losses,
    }


def write_metrics(out: Path, m: dict) -> Path:
    atomic_json(out / METRICS, m)
    return out / METRICS


def plot(out: Path, losses: list, before: float, after: float, title: str) -> Path:
    """Training loss per step, a moving average, and the held-out loss before and after."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in losses]
    ys = [r["loss"] for r in losses]
    w = max(1, len(ys) // 10)
    avg = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, ys, lw=0.8, alpha=0.45, label="train loss (per step)")
    ax.plot(steps, avg, lw=1.8, label=f"train loss ({w}-step mean)")
    last = steps[-1] if steps else 1
    ax.scatter([0, last], [before, after], color="C3", zorder=3, label="held-out loss (before, after)")
    ax.annotate(f"{before:.3f}", (0, before), textcoords="offset points", xytext=(6, 4))
    ax.annotate(f"{after:.3f}", (last, after), textcoords="offset points", xytext=(-34, 6))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per reply token")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(out / PLOT, buf.getvalue())
    return out / PLOT


def _short(s: str, n: int = 100) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n - 1] + "…"


def format_samples(title: str, rows: list) -> str:
    lines = [title]
    for r in rows:
        lines.append(textwrap.indent(f"Q: {_short(r['prompt'])}\nA: {_short(r['answer'])}", "  "))
    return "\n".join(lines)


def rss_mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"
