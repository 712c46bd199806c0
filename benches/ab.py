"""Before/after comparison of two source trees on the same machine: a benchmark file (or
some of its groups) runs under tree A, then B, then A, ... (processes alternating, so a
shared machine's drift lands on both), and each group's ratio ours / peer (the median of
the per-round ratios, benches/conftest.py) is compared between A and B. The peers are the
same code in both runs, so a change in the ratio is a change in our time.

    python benches/ab.py --a /path/to/old/src --b src --runs 2 -- benches/test_bench_linear.py -k "M=1 4096"

Prints a markdown table: per group and peer, A's and B's ratios (median over runs, and
their range) and B / A - 1 (positive: B is slower)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(src: str, pytest_args: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}", *pytest_args]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    ratios = {}
    for b in json.loads(out.read_text())["benchmarks"]:
        for row in b["extra_info"].get("interleaved", []):
            if row.get("ratio"):
                ratios[(row["group"], row["name"])] = row["ratio"]
    return ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, help="source folder of the 'before' tree (put on PYTHONPATH)")
    p.add_argument("--b", required=True, help="source folder of the 'after' tree")
    p.add_argument("--runs", type=int, default=2, help="processes per tree, alternating (default 2)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="-- then the benchmark file and pytest options")
    args = p.parse_args()
    pytest_args = [a for a in args.pytest_args if a != "--"]
    got: dict[str, list[dict]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for tree in ("a", "b"):
                got[tree].append(run_once(getattr(args, tree), pytest_args, Path(tmp) / f"{tree}{i}.json"))
                print(f"run {i + 1}/{args.runs} {tree} done", file=sys.stderr)
    keys = sorted(set().union(*got["a"]) & set().union(*got["b"]))
    print("| group | peer | ours / peer, A (before) | ours / peer, B (after) | B / A - 1 |")
    print("|---|---|---:|---:|---:|")
    for k in keys:
        a = [r[k] for r in got["a"] if k in r]
        b = [r[k] for r in got["b"] if k in r]
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| {k[0]} | {k[1]} | {ma:.3f} [{min(a):.3f}-{max(a):.3f}] | {mb:.3f} [{min(b):.3f}-{max(b):.3f}] "
              f"| {100 * (mb / ma - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
