"""Where the decode build's compute units go on a multi-die part, and whether that placement
is one to expect timing closure from: CUs per SLR, each SLR's share of LUT/FF/DSP/BRAM/URAM,
HBM pseudo-channels per CU, and how many CU memory ports cross die boundaries.

The rules, and what they rest on:
- an SLR of a stacked-silicon part is 1/slrs of its fabric, and the platform shell is spread
  over the SLRs in the same proportion (assumed: ``platforminfo`` gives the real split);
- CUs are spread evenly, the remainder going to the SLRs nearest the memory (a CU there
  reaches its pseudo-channels without a crossing);
- an SLR above ~70% of its LUTs is a timing risk at the HLS clock (issue 17's rule of thumb
  for 3-SLR parts; AMD's UltraFast methodology advises headroom below that), so a build is
  flagged when any SLR passes it;
- a memory port that crosses k SLR boundaries needs k register slices on its AXI path
  (latency, not bandwidth, on a streaming port)."""
from __future__ import annotations

from typing import Any

from . import resources as rs
from .boards import Board

LUT_RISK_PERCENT = 70.0


def plan(board: Board, per_cu: rs.Resources, cus: int) -> dict[str, Any]:
    n = max(1, board.slrs)
    order = sorted(range(n), key=lambda s: (abs(s - board.memory_slr), s))  # nearest the memory first
    counts = [cus // n] * n
    for s in order[: cus % n]:
        counts[s] += 1
    avail = {k: v / n for k, v in board.available().items()}
    per_slr = []
    for s in range(n):
        used = (per_cu * counts[s]).as_dict()
        pct = {k: (round(100.0 * v / avail[k], 1) if avail[k] else (0.0 if v == 0 else float("inf")))
               for k, v in used.items()}
        per_slr.append({"slr": s, "cus": counts[s], "percent": pct,
                        "crossings_per_port": abs(s - board.memory_slr) if n > 1 else 0})
    channels = board.channels // cus if board.port_binding == "channel" and cus else None
    worst = max(p["percent"]["lut"] for p in per_slr)
    return {"slrs": n, "memory_slr": board.memory_slr if n > 1 else None, "per_slr": per_slr,
            "pseudo_channels_per_cu": channels, "max_lut_percent": worst,
            "timing_risk": worst > LUT_RISK_PERCENT,
            "crossing_ports": sum(p["cus"] for p in per_slr if p["crossings_per_port"] > 0)}


def describe(fp: dict[str, Any], kind: str) -> list[str]:
    """Lines for the fpga-estimate report."""
    names = {"lut": "LUT", "ff": "FF", "dsp": "DSP", "bram": kind, "uram": "URAM"}
    out = []
    for p in fp["per_slr"]:
        use = ", ".join(f"{names[k]} {v:.0f}%" for k, v in p["percent"].items())
        where = "" if fp["slrs"] == 1 else (" (memory SLR)" if p["crossings_per_port"] == 0 else
                                            f" ({p['crossings_per_port']} crossing(s) per memory port)")
        out.append(f"SLR{p['slr']}: {p['cus']} CUs{where}: {use}")
    ch = f"{fp['pseudo_channels_per_cu']} pseudo-channel(s) per CU; " if fp["pseudo_channels_per_cu"] else ""
    verdict = (f"an SLR passes {LUT_RISK_PERCENT:.0f}% LUT: timing risk" if fp["timing_risk"] else
               f"every SLR under {LUT_RISK_PERCENT:.0f}% LUT")
    out.append(f"{ch}{fp['crossing_ports']} CU memory port(s) cross SLRs; {verdict}")
    return out
