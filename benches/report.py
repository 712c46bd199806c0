"""Turn a pytest-benchmark JSON file into the markdown tables of docs/benchmarks.md.

    python -m pytest benches --benchmark-json=bench-results/quant.json
    python benches/report.py bench-results/quant.json --title "Quantization" >> docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import sys


def table(data: dict) -> str:
    """The interleaved groups' table, then the sequential benchmarks' (a JSON of several
    suites holds both kinds: the second was dropped)."""
    interleaved = [r for b in data["benchmarks"] for r in b["extra_info"].get("interleaved", [])]
    sequential = [b for b in data["benchmarks"] if not b["extra_info"].get("interleaved")]
    parts = []
    if interleaved:
        from qlora_kernels.bench import format_table

        parts.append(format_table(interleaved))
    if sequential:
        parts.append(_sequential_table(sequential))
    return "\n\n".join(parts)


def _sequential_table(benchmarks: list[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for b in benchmarks:
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


SECTION_MARKS = {"avx2": "<!-- section avx2 -->", "avx512": "<!-- section avx512 -->"}
END_MARK = "<!-- end section -->"


def replace_section(cls: str, section_file: str, doc: str) -> None:
    """Puts section_file's text between docs/benchmarks.md's markers for this machine class
    (one section per class: AVX2-only, AVX-512), leaving the other class's section alone."""
    with open(section_file) as f:
        body = f.read().rstrip() + "\n"
    with open(doc) as f:
        text = f.read()
    start = SECTION_MARKS[cls]
    a = text.index(start) + len(start)
    b = text.index(END_MARK, a)
    with open(doc + ".tmp", "w") as f:
        f.write(text[:a] + "\n" + body + text[b:])
    import os

    os.replace(doc + ".tmp", doc)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--replace-section":
        replace_section(*sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("json_file")
    ap.add_argument("--title", default="Results")
    ap.add_argument("--command", default="")
    ap.add_argument("--level", type=int, default=2, help="markdown heading level of the title")
    a = ap.parse_args()
    with open(a.json_file) as f:
        data = json.load(f)
    m = data.get("machine_info", {})
    infos = [b["extra_info"] for b in data["benchmarks"]]
    # the header from the first benchmark that has each field (interleaved ones carry the peak)
    ei = next((i for i in infos if i.get("interleaved")), infos[0] if infos else {})
    calls = sorted({i.get("calls") for i in infos if i.get("interleaved") and i.get("calls") is not None})
    print(f"{'#' * a.level} {a.title}\n")
    print(f"- machine: {m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}, "
          f"{m.get('cpu', {}).get('count', '?')} logical CPUs; {ei.get('machine', '')}")
    print(f"- date: {data.get('datetime', '?')}")
    if a.command:
        print(f"- command: `{a.command}`")
    if ei.get("peak"):
        print("- this machine's limits (`qlora-kernels info --peak`):\n\n```\n" + ei["peak"] + "\n```")
    if ei.get("interleaved"):
        per = " or ".join(map(str, calls)) if calls else "?"
        print(f"- every group timed in {ei.get('rounds')} interleaved rounds (each round: every case once, "
              f"{per} calls or more back to back, by group; order rotating); 'ours / it' is our time over the "
              "peer's, round by round: median [min-max], < 1 means ours is faster")
    print()
    print(table(data))
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
