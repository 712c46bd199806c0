"""Turn a pytest-benchmark JSON file into the markdown tables of docs/benchmarks.md.

    python -m pytest benches --benchmark-json=bench-results/quant.json
    python benches/report.py bench-results/quant.json --title "Quantization" >> docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import sys


def table(data: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    lines = ["| group | implementation | median ms | throughput | our speedup vs it |", "|---|---|---:|---:|---:|"]
    for g, bs in groups.items():
        ours = [b["stats"]["median"] for b in bs if b["extra_info"].get("ours")]
        best = min(ours) if ours else None
        for b in sorted(bs, key=lambda b: (not b["extra_info"].get("ours"), b["stats"]["median"])):
            med = b["stats"]["median"]
            work, unit = b["extra_info"].get("work"), b["extra_info"].get("unit", "")
            scale = 1e9 if unit.startswith("G") else 1.0  # G-units are per 1e9; plain units as they are
            tp = f"{work / med / scale:.2f} {unit}" if work else ""
            sp = "" if b["extra_info"].get("ours") or best is None else f"{med / best:.2f}x"
            lines.append(f"| {g} | {b['name']} | {med * 1e3:.2f} | {tp} | {sp} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("json_file")
    ap.add_argument("--title", default="Results")
    ap.add_argument("--command", default="")
    a = ap.parse_args()
    with open(a.json_file) as f:
        data = json.load(f)
    m = data.get("machine_info", {})
    ei = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    print(f"## {a.title}\n")
    print(f"- machine: {m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}, "
          f"{m.get('cpu', {}).get('count', '?')} logical CPUs; {ei.get('machine', '')}")
    print(f"- date: {data.get('datetime', '?')}")
    if a.command:
        print(f"- command: `{a.command}`")
    print()
    print(table(data))
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
