"""What a board would do with a model: decode tokens/s at batch 1, QLoRA training
tokens/s, resource use, and which bound limits each. Built from the HLS design parameters
(params.py), the kernels' cycle counts (kernels.py), per-CU resources (resources.py) and a
board's memory and fabric (boards.py). Every assumption is listed in the result."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from . import floorplan
from . import kernels as kc
from . import resources as rs
from .boards import Board, get_board
from .llm import ModelConfig, get_model
from .params import DESIGN, Design

NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class Options:
    blocksize: int = 64
    double_quant: bool = False
    lm_head: str = "bf16"          # "bf16" (bitsandbytes/QLoRA default: not quantized) or "4bit"
    context: int = 1024            # KV positions read per decoded token for the "with KV" figure
    kv_bytes: int = 2              # bf16/fp16 KV cache
    efficiency: float | None = None  # HBM derating; None: the board's value
    clock_mhz: float | None = None   # kernel clock; None: the board's value
    step_overhead_us: float = 0.5  # start/done handshake of each dependent step (device-side sequencer)
    glue_lanes: int = 16           # fp32 elements per cycle per CU for norms, RoPE, residuals, reductions
    lora_rank: int = 16
    train_batch: int = 1
    train_seq: int = 512
    util_cap: float = 0.85         # fraction of the post-shell fabric a build may use (routability)
    operators: str = "vitis"       # fp32 operator costs: "vitis" (assumed csynth figures) or "rtl" (measured, hls/rtl)


def weight_bytes_per_token(model: ModelConfig, blocksize: int = 64, double_quant: bool = False,
                           lm_head: str = "bf16") -> dict[str, float]:
    """Bytes streamed per decoded token, KV cache excluded: the 4-bit decoder matrices
    (0.5 byte per weight + absmax), the lm_head, one embedding row and the norms (16-bit)."""
    if double_quant:
        per_param = 0.5 + 1.0 / blocksize + 4.0 / (blocksize * NESTED_BLOCKSIZE)
    else:
        per_param = 0.5 + 4.0 / blocksize
    head_params = model.embedding_params
    head = head_params * 2.0 if (lm_head == "bf16" or model.tied) else head_params * per_param
    out = {"linear": model.linear_params * per_param, "lm_head": head, "embedding_row": model.hidden * 2.0,
           "norms": model.norm_params * 2.0}
    out["total"] = sum(out.values())
    return out


def roofline_tokens_per_s(board: Board, bytes_per_token: float, efficiency: float = 1.0) -> float:
    return board.peak_gbps * 1e9 * efficiency / bytes_per_token


def roofline(board: Board, design: Design, lanes_total: int, bytes_per_mac: float, efficiency: float = 1.0,
             clock_hz: float | None = None) -> dict[str, float]:
    """Classic roofline of a build: peak fp32 GFLOP/s of its multiply-add lanes, memory
    GB/s, the ridge point (flop per byte), and what a kernel with `bytes_per_mac` of
    traffic per multiply-add attains."""
    f = clock_hz or board.kernel_clock_mhz * 1e6
    peak = 2.0 * lanes_total * f / 1e9
    bw = board.peak_gbps * efficiency
    intensity = 2.0 / bytes_per_mac
    return {"peak_gflops": peak, "memory_gbps": bw, "ridge_flop_per_byte": peak / bw,
            "intensity_flop_per_byte": intensity, "attainable_gflops": min(peak, intensity * bw),
            "bound": "memory" if intensity * bw < peak else "compute"}


@dataclass
class Estimate:
    board: Board
    model: ModelConfig
    options: Options
    design: Design
    decode: dict[str, Any]
    training: dict[str, Any]
    assumptions: list[str] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"board": {"key": self.board.key, "name": self.board.name, "device": self.board.device,
                          "sources": list(self.board.sources), "unverified": list(self.board.unverified)},
                "model": {"name": self.model.name, "params": self.model.total_params,
                          "linear_params": self.model.linear_params},
                "options": self.options.__dict__, "design": self.design.as_params(), "decode": self.decode,
                "training": self.training, "assumptions": self.assumptions, "provenance": self.provenance}

    def __str__(self) -> str:
        from .report import format_text

        return format_text(self)


def _clock(board: Board, o: Options) -> float:
    return (o.clock_mhz or board.kernel_clock_mhz) * 1e6


def _eff(board: Board, o: Options) -> float:
    return board.efficiency if o.efficiency is None else o.efficiency


def _cu_bandwidth(board: Board, o: Options, d: Design, cus: int):
    """GB/s one CU streams when `used` CUs run: a port carries one beat per cycle; with
    channel-bound ports a CU owns channels/cus channels, through a NoC it shares the whole."""
    port = d.word_bytes * _clock(board, o) / 1e9
    eff = _eff(board, o)
    if board.port_binding == "channel":
        own = (board.channels // cus) * board.channel_gbps * eff
        return lambda used: min(port, own)
    return lambda used: min(port, board.peak_gbps * eff / max(used, 1))


def _fits(used: rs.Resources, board: Board, cap: float) -> bool:
    avail = board.available()
    return all(v <= avail[k] * cap + 1e-9 for k, v in used.as_dict().items())


def _resource_report(used: rs.Resources, board: Board, what: str) -> dict[str, Any]:
    util = rs.utilization(used, board)
    worst = max(util, key=lambda k: util[k]["percent"])
    return {"build": what, "use": util, "fits": all(u["percent"] <= 100.0 for u in util.values()),
            "most_used": worst, "most_used_percent": util[worst]["percent"]}


def gemv_cu_candidates(board: Board, o: Options, d: Design) -> list[int]:
    """CU counts worth trying: with channel-bound ports, divisors of the channel count;
    through a NoC, multiples of 4 from what saturates the memory up to the port limit.
    Only counts whose CUs fit the fabric (under util_cap)."""
    port = d.word_bytes * _clock(board, o) / 1e9
    if board.port_binding == "channel":
        cands = [c for c in range(1, board.max_ports + 1) if board.channels % c == 0]
    else:
        lo = max(1, int(board.peak_gbps * _eff(board, o) // port))
        cands = sorted({c for c in range(lo, board.max_ports + 1) if c % 4 == 0} | {lo, board.max_ports})
    per_cu = rs.gemv_cu(d, board, o.operators)
    return [c for c in cands if _fits(per_cu * c, board, o.util_cap)] or [min(cands)]


def decode_estimate(board: Board, model: ModelConfig, o: Options, d: Design, context: int,
                    cus: int | None = None) -> dict[str, Any]:
    """Decode time per token; with cus=None, the CU count (among the candidates that fit)
    that gives the shortest token time."""
    if cus is None:
        runs = [decode_estimate(board, model, o, d, context, c) for c in gemv_cu_candidates(board, o, d)]
        return min(runs, key=lambda r: (round(r["ms_per_token"], 6), r["compute_units"]))
    f = _clock(board, o)
    eff_total = board.peak_gbps * _eff(board, o) * 1e9
    bw = _cu_bandwidth(board, o, d, cus)
    spw = d.scales_per_beat(o.blocksize)
    scale_bytes = 1.0 + 4.0 / NESTED_BLOCKSIZE if o.double_quant else 4.0
    step = o.step_overhead_us * 1e-6
    plans = [kc.plan_gemv(d, name, n, k, False, spw, cus, f, bw, scale_bytes) for name, n, k in model.linears()]
    head_bf16 = o.lm_head == "bf16" or model.tied
    head = kc.plan_gemv(d, "lm_head", model.vocab, model.hidden, head_bf16, spw, cus, f, bw, scale_bytes)
    h, i = model.hidden, model.intermediate
    q_kv = (model.heads + model.kv_heads) * model.hd
    # elementwise floats per layer: norms, RoPE, residuals, SiLU*up, and the partial-sum reductions
    elems = 2 * h + 2 * q_kv + h + 3 * h + 2 * h + 3 * i + 3 * h
    elems += sum((p.k_groups + 1) * p.N for p in plans if p.k_groups > 1)
    kv_layer = context * model.kv_bytes_per_position(o.kv_bytes) / model.layers
    kv_write = 2 * model.kv_heads * model.hd * o.kv_bytes

    def glue(extra_bytes: float, n_elems: float, steps: int) -> float:
        return max((n_elems * 4 + extra_bytes) / eff_total, n_elems / (o.glue_lanes * cus * f)) + steps * step

    t_mats = sum(p.time_us * 1e-6 + step for p in plans)
    t_glue = glue(kv_layer + kv_write, elems, 4)
    t_head = head.time_us * 1e-6 + step + glue(0, 2 * h + (head.k_groups + 1) * model.vocab * (head.k_groups > 1), 1)
    t_token = model.layers * (t_mats + t_glue) + t_head
    mem_us = sum(p.memory_us for p in plans) * model.layers + head.memory_us
    core_us = sum(p.core_us for p in plans) * model.layers + head.core_us
    return {"tokens_per_s": 1.0 / t_token, "ms_per_token": t_token * 1e3, "compute_units": cus,
            "cu_gbps": round(bw(cus), 3), "aggregate_gbps": round(min(bw(cus) * cus, eff_total / 1e9), 1),
            "matrices": [p.as_dict() for p in plans] + [head.as_dict()],
            "time_split_ms": {"matrices": round(model.layers * t_mats * 1e3, 4), "lm_head": round(t_head * 1e3, 4),
                              "glue_and_attention": round(model.layers * t_glue * 1e3, 4)},
            "bound": "memory" if mem_us >= core_us else "compute"}


def _gemm_time(d: Design, N: int, K: int, M: int, cus: int, spw: int, f: float, gbps: float, t_kernel: bool) -> float:
    rows = -(-N // cus)
    row_calls, tiles = -(-rows // d.gemm_max_rows), -(-K // d.lanes)
    tile_calls = -(-tiles // d.gemm_max_tiles)
    r, t, mt = -(-rows // row_calls), -(-tiles // tile_calls), -(-M // d.gemm_tm)
    cyc = (kc.gemm_t_call_cycles if t_kernel else kc.gemm_call_cycles)(d, r, t, mt) + kc.AXI_LATENCY
    nbytes = kc.gemm_call_bytes(d, r, t, mt, spw, t_kernel)
    return row_calls * tile_calls * max(cyc / f, nbytes / (gbps * 1e9))


def training_estimate(board: Board, model: ModelConfig, o: Options, d: Design) -> dict[str, Any]:
    f = _clock(board, o)
    eff_total = board.peak_gbps * _eff(board, o) * 1e9
    port = d.word_bytes * f / 1e9
    M, r, S = o.train_batch * o.train_seq, o.lora_rank, o.train_seq
    spw = d.scales_per_beat(o.blocksize)
    pair, lora = rs.gemm_cu(d, board, o.operators) + rs.gemm_t_cu(d, board, o.operators), rs.lora_cus(d, board, o.operators)
    best = None
    for lp in (1, 2, 3, 4):
        g = 0
        while _fits(pair * (g + 1) + lora * lp, board, o.util_cap):
            g += 1
        if g == 0:
            continue
        gbps = min(port, eff_total / 1e9 / g)
        fwd = bwd = lor = 0.0
        for _, N, K in model.linears():
            fwd += _gemm_time(d, N, K, M, g, spw, f, gbps, False)
            bwd += _gemm_time(d, N, K, M, g, spw, f, gbps, True)
            down = (kc.lora_down_cycles(d, M, K, r) + kc.lora_down_cycles(d, M, N, r)
                    + kc.lora_down_cycles(d, N, M, r) + kc.lora_down_cycles(d, K, M, r))
            up = kc.lora_up_cycles(d, M, N) + kc.lora_up_cycles(d, M, K)
            lor += (down + up) / (lp * f)
        lanes = 2 * g * d.lanes
        head = 2 * M * model.vocab * model.hidden / (g * d.lanes * f)           # fwd + dx, bf16 lm_head
        attn = model.layers * 3 * M * S * model.hidden / (lanes * f)            # QK^T, PV, their gradients
        act_bytes = model.layers * M * (14 * model.hidden + 6 * model.intermediate) * 4 * 3
        glue = ((act_bytes + 28 * lora_params_total(model, r)) / eff_total
                + model.layers * 12 * o.step_overhead_us * 1e-6)
        t_step = model.layers * (fwd + bwd + lor) + head + attn + glue
        if best is None or t_step < best[0]:
            best = (t_step, g, lp, {"base_forward": model.layers * fwd, "base_input_grad": model.layers * bwd,
                                    "lora": model.layers * lor, "lm_head": head, "attention": attn, "glue": glue})
    if best is None:
        return {"fits": False, "tokens_per_s": 0.0, "bound": "resources (not even one GEMM pair fits)"}
    t_step, g, lp, parts = best
    used = pair * g + lora * lp
    macs = 2 * model.linear_params + 2 * model.vocab * model.hidden + 3 * r * model.layers * sum(
        n + k for _, n, k in model.linears()) + model.layers * 3 * S * model.hidden
    # activations kept for the backward pass (fp32), the 4-bit weights, and LoRA's fp32
    # parameters, gradients and two AdamW moments
    act_mem = M * model.layers * (5 * model.hidden + 3 * model.intermediate + model.heads * S) * 4
    w_mem = weight_bytes_per_token(model, o.blocksize, o.double_quant, o.lm_head)["total"]
    mem = act_mem + w_mem + 16 * lora_params_total(model, r)
    return {"tokens_per_s": M / t_step, "step_s": t_step, "tokens_per_step": M, "gemm_pairs": g, "lora_pairs": lp,
            "macs_per_token": macs, "time_split_s": {k: round(v, 5) for k, v in parts.items()},
            "bound": "compute (the fp32 multipliers that fit: resource-limited)",
            "memory_gb": round(mem / 1e9, 2), "memory_fits": mem / 1e9 < board.memory_gb,
            "resources": _resource_report(used, board, f"{g} x (qk_gemm_4bit + qk_gemm_4bit_t) + {lp} x LoRA pair")}


def lora_params_total(model: ModelConfig, r: int) -> int:
    return model.layers * r * sum(n + k for _, n, k in model.linears())


def check_options(o: Options, design: Design = DESIGN) -> None:
    """Only what the HLS design can be built for: the model has no meaning elsewhere
    (blocksize 16 would give 8 scales a beat, which the engines refuse; an efficiency above
    1 would report more than the board's bandwidth)."""
    from ..formats import BLOCKSIZES

    def number(name, v, ok, says):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise ValueError(f"{name} must be {says}, got {v!r}")

    if o.lm_head not in ("bf16", "4bit"):
        raise ValueError(f"lm_head must be 'bf16' or '4bit', got {o.lm_head!r}")
    if isinstance(o.blocksize, bool) or o.blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (the formats' block sizes), got {o.blocksize!r}")
    number("lora_rank", o.lora_rank, lambda v: v == int(v) and 1 <= v, "an integer >= 1")
    if o.lora_rank > design.lora_max_r:
        raise ValueError(f"lora_rank {o.lora_rank}: the LoRA engine takes ranks up to {design.lora_max_r} "
                         "(QK_LORA_MAX_R); a larger rank would run as several calls, which is not modelled")
    for name in ("train_batch", "train_seq", "kv_bytes", "glue_lanes"):
        number(name, getattr(o, name), lambda v: v == int(v) and v >= 1, "an integer >= 1")
    number("context", o.context, lambda v: v == int(v) and v >= 0, "an integer >= 0")
    number("util_cap", o.util_cap, lambda v: 0 < v <= 1, "in (0, 1]")
    number("step_overhead_us", o.step_overhead_us, lambda v: v >= 0, ">= 0")
    if o.efficiency is not None:
        number("efficiency", o.efficiency, lambda v: 0 < v <= 1, "in (0, 1] (a fraction of the board's bandwidth)")
    if o.clock_mhz is not None:
        number("clock_mhz", o.clock_mhz, lambda v: v > 0, "> 0 (or None: the board's clock)")


def estimate(board: str | Board = "u280", model: Any = "phi-3-mini", *, design: Design = DESIGN,
             **options: Any) -> Estimate:
    """Decode and training estimates for `model` (a name, a Hugging Face config dict, or a
    config.json path) on `board`; keyword options are the fields of ``Options``."""
    b, m, o = get_board(board), get_model(model), replace(Options(), **options)
    check_options(o, design)
    # The packed layout needs whole blocks along K (hls/host/qk_layout.cpp refuses the rest);
    # the engines planned here could not run such a layer.
    odd = [f"{name} (K={k})" for name, _, k in m.linears() if k % o.blocksize]
    if o.lm_head == "4bit" and m.hidden % o.blocksize:
        odd.append(f"lm_head (K={m.hidden})")
    if odd:
        raise ValueError(f"blocksize {o.blocksize} does not divide the in_features of {', '.join(odd)}: the 4-bit "
                         "layout needs whole blocks along K; pick a blocksize that divides them")
    wb = weight_bytes_per_token(m, o.blocksize, o.double_quant, o.lm_head)
    dec0 = decode_estimate(b, m, o, design, context=0)
    decc = decode_estimate(b, m, o, design, context=o.context, cus=dec0["compute_units"])
    roof = roofline_tokens_per_s(b, wb["total"])
    cus = dec0["compute_units"]
    decode = {**dec0, "roofline_tokens_per_s": roof,
              "effective_roofline_tokens_per_s": roofline_tokens_per_s(b, wb["total"], _eff(b, o)),
              "fraction_of_roofline": dec0["tokens_per_s"] / roof, "bytes_per_token": wb,
              "kv_bytes_per_token_at_context": o.context * m.kv_bytes_per_position(o.kv_bytes),
              "tokens_per_s_at_context": decc["tokens_per_s"], "context": o.context,
              "resources": _resource_report(rs.gemv_cu(design, b, o.operators) * cus, b, f"{cus} x qk_gemv_4bit")}
    decode["floorplan"] = floorplan.plan(b, rs.gemv_cu(design, b, o.operators), cus)
    decode["bound"] = ("resources" if not decode["resources"]["fits"] else
                       "memory" if dec0["bound"] == "memory" else "compute")
    decode["roofline"] = roofline(b, design, cus * design.lanes, wb["total"] / m.total_params, _eff(b, o), _clock(b, o))
    training = training_estimate(b, m, o, design)
    if training.get("gemm_pairs"):
        # each weight beat is reused QK_GEMM_TM times; x and y are fp32
        per_mac = (0.5 + 4.0 / o.blocksize) / design.gemm_tm + 8.0 / max(1, m.hidden)
        training["roofline"] = roofline(b, design, 2 * training["gemm_pairs"] * design.lanes, per_mac, _eff(b, o),
                                        _clock(b, o))
    return Estimate(b, m, o, design, decode, training, assumptions(b, o, design, cus), provenance(b, o))


def provenance(b: Board, o: Options) -> list[str]:
    """Where each number the resource and clock figures rest on comes from: measured (which
    tool, which source) or assumed."""
    out = []
    for op, (r, src) in rs.op_costs(b, o.operators).items():
        out.append(f"{op}: {r.lut:,.0f} LUT, {r.ff:,.0f} FF, {r.dsp:g} DSP per instance ({src})")
    clock = (f"kernel clock {(o.clock_mhz or b.kernel_clock_mhz):g} MHz: "
             + ("set by the caller" if o.clock_mhz else "assumed (the board's default kernel clock)"))
    try:
        from .measured import load

        ecp5 = load().get("ecp5", {})
        fmax = ", ".join(f"{k} {max(v['fmax_mhz'].values())} MHz" for k, v in ecp5.items())
        if fmax:
            clock += f"; measured only on a Lattice ECP5 with nextpnr ({fmax}), not an UltraScale+ figure"
    except (OSError, ValueError, KeyError):
        pass
    out.append(clock)
    out.append("per-CU ports, control, buffers and tables: assumed (typical Vitis figures, resources.py)")
    out.append("cycle counts: the HLS loop structure (kernels.py), assumed II=1; the RTL decode unit's II=1 and "
               "latency are measured by Verilator (tests/test_rtl.py)")
    return out


def assumptions(b: Board, o: Options, d: Design, cus: int) -> list[str]:
    eff = _eff(b, o)
    ports = (f"each owning {b.channels // cus} pseudo-channel(s)" if b.port_binding == "channel"
             else "through the NoC")
    absmax = ("double-quantized (8-bit + fp32 per 256 blocks, assumed decoded in the scale reader: the GEMV "
              "top here reads fp32 scales)" if o.double_quant else "fp32")
    return [
        f"kernel clock {(o.clock_mhz or b.kernel_clock_mhz):g} MHz (HLS target {d.target_clock_mhz} MHz)",
        f"memory: {b.memory} {b.peak_gbps:g} GB/s theoretical, derated to {eff:.0%} = {b.peak_gbps * eff:.0f} GB/s "
        f"({b.efficiency_source if o.efficiency is None else 'set by the caller'})",
        f"decode build: {cus} GEMV compute units, one {d.word_bits}-bit weight port each "
        f"({ports}), plus a scale port and a small x/y port",
        f"GEMV: {d.lanes} 4-bit weights per cycle per CU, II={d.ii}, tables built in {d.build_cycles} cycles "
        f"({d.build_muls} fmul + {d.build_adds} fadd), weight FIFO {d.prefetch_beats} beats; bf16 lm_head in the "
        f"same CUs ({d.bf16_lanes} per beat)",
        f"weights: 4-bit, blocksize {o.blocksize}, absmax {absmax}; "
        f"lm_head {'bf16' if o.lm_head == 'bf16' else '4-bit'}; norms and the embedding row 16-bit",
        "q/k/v and gate/up are streamed as fused matrices; a matrix is split into K-slices x row-slices over "
        "the CUs, and K-slices leave partial sums that the next elementwise step reduces (their traffic is counted)",
        f"each dependent step (matrix, elementwise pass) pays {o.step_overhead_us:g} us of start/done overhead: "
        "assumes a device-side sequencer; host-launched XRT kernels cost ~5-10 us each",
        f"norms, RoPE, residuals, SiLU*up and reductions: {o.glue_lanes} fp32/cycle/CU streaming units "
        "(not in hls/), limited by memory bandwidth",
        f"KV cache: {o.kv_bytes}-byte K and V, counted separately (tokens_per_s excludes it; "
        f"tokens_per_s_at_context reads {o.context} positions per token); attention modelled at the memory rate",
        f"training: batch {o.train_batch} x {o.train_seq} tokens, LoRA r={o.lora_rank} on qkv/o/gate_up/down, "
        "forward and input-gradient engines are separate CUs (one idles while the other runs), bf16 lm_head and "
        "attention matmuls assumed at the GEMM engines' rate (no such HLS engine here), no gradient checkpointing",
        (f"resources: operator costs per family ({b.family}) are typical csynth figures, not synthesis of this "
         f"code" if o.operators == "vitis" else "resources: fp32 operators as the exact RTL operators of hls/rtl "
         "synthesized by Yosys (subnormals and round to nearest even, as the reference computes)")
        + f"; {b.shell_fraction:.0%} of the fabric assumed taken by the platform shell",
    ] + ([f"board figures not verified against the data sheet here: {', '.join(b.unverified)}"] if b.unverified
         else [])
