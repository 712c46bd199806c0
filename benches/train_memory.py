"""Peak RSS of a few training steps per configuration, each in its own process (peak RSS
is a per-process high-water mark).

    python benches/train_memory.py [--model phi3|smollm2] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, torch
torch.set_num_threads(2)
from qlora_kernels.bench import train as bench_train
which, kind, dora, steps = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
base, arch = bench_train.random_phi3() if which == "phi3" else bench_train.smollm2()
pm = bench_train.build(kind, base, arch, use_dora=dora)
del base
step = bench_train.step_fn(pm, vocab=pm.config.vocab_size)
for _ in range(steps):
    step()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="phi3", choices=["phi3", "smollm2"])
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for kind, dora in (("ours", False), ("ours-no-norm-mlp", False), ("ours-unfused", False), ("bnb", False),
                       ("dense", False), ("ours", True), ("bnb", True)):
        r = subprocess.run([sys.executable, "-c", CHILD, a.model, kind, "1" if dora else "0", str(a.steps)],
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append((kind, "DoRA" if dora else "LoRA", m["peak_rss_mb"]))
    print("| model | base | adapter | peak RSS MB |\n|---|---|---|---:|")
    for kind, ad, mb in rows:
        print(f"| {a.model} | {kind} | {ad} | {mb:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
