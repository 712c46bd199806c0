"""Peak RSS per rank of the same QLoRA fine-tune (a random Phi-3, NF4 base, LoRA r=8 on every
projection, qlora_kernels.optim.AdamW) in one process and on 2 processes under DDP, FSDP2 and
DeepSpeed ZeRO-3 (gloo, loopback), printed as a markdown table for docs/benchmarks.md.

    python benches/dist_memory.py [--hidden 1024 --layers 8 --steps 3]

"Training peak" is the kernel's high-water mark (VmHWM) reset after the model is built and
quantized, so it holds the steps only; "process peak" includes building the fp32 model
before quantization (every rank builds it). Memory, not time: one run is enough."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_distributed import launch  # noqa: E402  (the loopback launcher of the tests)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    extra = ["--hidden", str(a.hidden), "--layers", str(a.layers), "--steps", str(a.steps),
             "--global-batch", str(a.global_batch), "--seq", str(a.seq)]
    rows = []
    for mode in ("single", "ddp", "fsdp2", "zero3"):
        with tempfile.TemporaryDirectory() as d:
            results = launch(mode, Path(d), *extra)
            for r in results:
                if r.returncode:
                    raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
            res = torch.load(Path(d) / "result.pt")
        assert res["peak_reset"], "/proc/self/clear_refs is not writable: the training peak would include the build"
        for rank, (process_kib, train_kib) in enumerate(res["peak_rss_kib"]):
            rows.append((mode, rank, train_kib / 1024, process_kib / 1024, res["packed_local_fraction"],
                         res["seconds"] / a.steps))
        print(f"{mode}: done", file=sys.stderr)
    print(f"Random Phi-3 (hidden {a.hidden}, {a.layers} layers, vocab 4096), NF4 base + LoRA r=8 on every "
          f"projection, global batch {a.global_batch} x {a.seq} tokens, {a.steps} steps, 1 thread per process.\n")
    print("| engine | processes | rank | training peak RSS (MiB) | process peak RSS (MiB) | packed 4-bit bytes held | s/step |")
    print("|---|---|---|---|---|---|---|")
    for mode, rank, train, proc, frac, sec in rows:
        n = 1 if mode == "single" else 2
        print(f"| {mode} | {n} | {rank} | {train:.0f} | {proc:.0f} | {frac:.0%} | {sec:.2f} |")


if __name__ == "__main__":
    main()
