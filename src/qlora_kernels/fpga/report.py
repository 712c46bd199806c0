"""Plain-text rendering of an Estimate (the `qlora-kernels fpga-estimate` output)."""
from __future__ import annotations

from typing import Any

from . import floorplan


def _res_line(r: dict[str, Any], kind: str) -> str:
    names = {"dsp": "DSP", "lut": "LUT", "ff": "FF", "bram": kind, "uram": "URAM"}
    parts = [f"{names[k]} {v['used']:,.0f}/{v['available']:,} ({v['percent']:.1f}%)" for k, v in r["use"].items()
             if v["available"] or v["used"]]
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    return f"{r['build']}: " + ", ".join(parts) + f" -> {verdict} (most used: {names[r['most_used']]})"


def _roof(r: dict[str, float]) -> str:
    return (f"{r['peak_gflops']:,.0f} GFLOP/s peak of the lanes, {r['memory_gbps']:,.0f} GB/s, ridge "
            f"{r['ridge_flop_per_byte']:.2f} flop/B; intensity {r['intensity_flop_per_byte']:.2f} flop/B -> "
            f"{r['attainable_gflops']:,.0f} GFLOP/s ({r['bound']}-bound)")


def warnings(est) -> list[str]:
    out = []
    for what, res in (("decode", est.decode.get("resources")), ("training", est.training.get("resources"))):
        if res and res["most_used_percent"] > 75.0:
            out.append(f"{what} build uses {res['most_used_percent']:.0f}% of the {res['most_used']} left by the "
                       f"shell: placement and timing closure at {est.options.clock_mhz or est.board.kernel_clock_mhz:g} MHz "
                       "are not assured")
    fp = est.decode.get("floorplan")
    if fp and fp["timing_risk"]:
        out.append(f"decode build: an SLR uses {fp['max_lut_percent']:.0f}% of its LUTs (over "
                   f"{floorplan.LUT_RISK_PERCENT:.0f}%): expect timing closure trouble on a multi-die part")
    if est.board.unverified:
        out.append(f"{est.board.name}: {', '.join(est.board.unverified)} not verified against the data sheet")
    if est.training and not est.training.get("memory_fits", True):
        out.append("training activations and weights exceed the board's memory: use gradient checkpointing")
    return out


def format_text(est) -> str:
    b, m, d, t = est.board, est.model, est.decode, est.training
    wb = d["bytes_per_token"]
    L = []
    L.append(f"FPGA estimate: {m.name} ({m.total_params / 1e9:.2f}B parameters) on {b.name} ({b.device})")
    L.append("")
    L.append("Decode, batch 1, KV cache excluded")
    L.append(f"  tokens/s          {d['tokens_per_s']:.1f}  ({d['fraction_of_roofline']:.1%} of the "
             f"{d['roofline_tokens_per_s']:.1f} tokens/s {b.memory} roofline at {b.peak_gbps:g} GB/s; "
             f"{d['effective_roofline_tokens_per_s']:.1f} after derating)")
    L.append(f"  bytes per token   {wb['total'] / 1e6:,.1f} MB = {wb['linear'] / 1e6:,.1f} MB 4-bit matrices + "
             f"{wb['lm_head'] / 1e6:,.1f} MB lm_head + {(wb['norms'] + wb['embedding_row']) / 1e6:.1f} MB "
             "norms/embedding row")
    L.append(f"  bound             {d['bound']}: {d['compute_units']} GEMV CUs x {d['cu_gbps']:.2f} GB/s = "
             f"{d['aggregate_gbps']:g} GB/s")
    L.append(f"  with KV cache     {d['tokens_per_s_at_context']:.1f} tokens/s at {d['context']} positions "
             f"(+{d['kv_bytes_per_token_at_context'] / 1e6:,.1f} MB per token)")
    ts = d["time_split_ms"]
    L.append(f"  time per token    {d['ms_per_token']:.3f} ms: matrices {ts['matrices']:.3f}, lm_head "
             f"{ts['lm_head']:.3f}, elementwise/attention {ts['glue_and_attention']:.3f}")
    L.append("  per matrix (per layer)      N x K        split k x n  rows/CU tiles/CU  time us  bound")
    for p in d["matrices"]:
        L.append(f"    {p['name']:<14} {p['fmt']:<5} {p['N']:>6} x {p['K']:<5}  {p['k_groups']:>3} x {p['n_groups']:<3}"
                 f"   {p['rows_per_cu']:>6} {p['tiles_per_cu']:>6}   {p['time_us']:>8.2f}  {p['bound']}")
    L.append(f"  resources         {_res_line(d['resources'], b.bram_kind)}")
    for i, line in enumerate(floorplan.describe(d["floorplan"], b.bram_kind)):
        L.append(("  floorplan         " if i == 0 else "                    ") + line)
    L.append("  roofline          " + _roof(d["roofline"]))
    L.append("")
    if t.get("tokens_per_s"):
        L.append(f"QLoRA training step (batch {est.options.train_batch} x {est.options.train_seq} tokens, "
                 f"LoRA r={est.options.lora_rank})")
        L.append(f"  tokens/s          {t['tokens_per_s']:.2f}  ({t['step_s']:.2f} s per step, "
                 f"{t['macs_per_token'] / 1e9:.2f} GMAC per token)")
        L.append(f"  bound             {t['bound']}")
        L.append("  time per step     " + ", ".join(f"{k} {v:.3f} s" for k, v in t["time_split_s"].items()))
        L.append(f"  memory            {t['memory_gb']:.2f} GB of {b.memory_gb:g} GB "
                 f"({'fits' if t['memory_fits'] else 'DOES NOT FIT'})")
        L.append(f"  resources         {_res_line(t['resources'], b.bram_kind)}")
        L.append("  roofline          " + _roof(t["roofline"]))
    else:
        L.append(f"QLoRA training: {t.get('bound')}")
    L.append("")
    L.append("Assumptions")
    L += [f"  - {a}" for a in est.assumptions]
    if est.provenance:
        L.append("Provenance (measured or assumed)")
        L += [f"  - {x}" for x in est.provenance]
    w = warnings(est)
    if w:
        L.append("Warnings")
        L += [f"  - {x}" for x in w]
    L.append("Sources")
    L += [f"  - {s}" for s in b.sources]
    return "\n".join(L)
