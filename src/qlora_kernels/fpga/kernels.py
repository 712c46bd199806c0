"""Cycle counts of the HLS top functions, and how a matrix is split over compute units.

Each ``*_cycles`` function follows the loop structure of its kernel in hls/*.cpp (trip
counts x II, one pipeline fill per pipelined-loop entry), with the parameters of
``params.Design``. A call takes max(core cycles / f, bytes / port bandwidth) plus the
memory's first-access latency: the kernels are DATAFLOW regions whose readers run ahead
of the core (the GEMV's weight FIFO holds a whole table build, QK_PREFETCH_BEATS)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .params import Design

# Pipeline depths (cycles from a loop's first read to its last write) and memory latency:
# estimates for fp32 operators of ~4-7 cycles at 300 MHz, not synthesis results.
GEMV_DEPTH = 60     # table read, 4-level tree, scale datapath (2 mul + 2 add levels), accumulate
GEMM_DEPTH = 70     # decode, multiply, 5-level tree, scale datapath, accumulate
LORA_DEPTH = 60     # multiply, 6-level tree, accumulate
AXI_LATENCY = 150   # first beat of a burst from HBM, ~500 ns at 300 MHz


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemv_call_cycles(d: Design, rows: int, tiles: int, bf16: bool = False) -> int:
    """qk_gemv_4bit, one call: ROM and y loads, then for t = 0..tiles: latch tile t's x,
    build its tables while streaming tile t-1 (max(rows, build) cycles), then store y."""
    width = d.bf16_lanes if bf16 else d.lanes
    build = d.bf16_build_cycles if bf16 else d.build_cycles
    cycles = d.codes + _cdiv(rows, 16)
    for t in range(tiles + 1):
        srows = rows if t > 0 else 0
        b = build if t < tiles else 0
        latch = width // 16 if t < tiles else 0
        cycles += latch + max(srows, b) * d.ii + GEMV_DEPTH
    return cycles + _cdiv(rows, 16)


def gemv_call_bytes(d: Design, rows: int, tiles: int, spw: int, bf16: bool = False, scale_bytes: float = 4.0) -> float:
    """Bytes one call moves. scale_bytes is 4 for fp32 absmax; with double quantization
    the absmax stream is 1 byte per block plus an fp32 scale per 256 blocks."""
    width = d.bf16_lanes if bf16 else d.lanes
    weights = rows * tiles * d.word_bytes
    scales = 0 if bf16 else rows * tiles * spw * scale_bytes
    x = tiles * width * 4
    y = 2 * _cdiv(rows, 16) * d.word_bytes
    return weights + scales + x + y


def gemm_call_cycles(d: Design, rows: int, tiles: int, mtiles: int) -> int:
    """qk_gemm_4bit: per row tile, load y, then per 128-column tile load x (TM x 8 beats)
    and run rows x TM cycles (one weight beat per TM cycles); store y."""
    rb = _cdiv(rows, 16)
    per_tile = d.gemm_tm * (d.lanes // 16) + rows * d.gemm_tm + GEMM_DEPTH
    return d.codes + mtiles * (2 * d.gemm_tm * rb + tiles * per_tile)


def gemm_t_call_cycles(d: Design, rows: int, tiles: int, mtiles: int) -> int:
    """qk_gemm_4bit_t: per row tile, load dy; per tile load and store 128 accumulators x TM."""
    rb = _cdiv(rows, 16)
    per_tile = 2 * d.gemm_tm * (d.lanes // 16) + rows * d.gemm_tm + GEMM_DEPTH
    return d.codes + mtiles * (d.gemm_tm * rb + tiles * per_tile)


def gemm_call_bytes(d: Design, rows: int, tiles: int, mtiles: int, spw: int, t_kernel: bool = False) -> int:
    """Weights and scales stream once per row tile. The operand is read once (x forward, dy
    for qk_gemm_4bit_t); the accumulated result is read and written (y, dx), as the cycle
    counts above load and store it."""
    weights = mtiles * rows * tiles * (d.word_bytes + 4 * spw)
    k_side, n_side = (2, 1) if t_kernel else (1, 2)
    acts = mtiles * d.gemm_tm * (tiles * d.lanes * k_side + rows * n_side) * 4
    return weights + acts


def lora_down_cycles(d: Design, rows: int, k: int, r: int) -> int:
    """qk_lora_down: per row tile zero the accumulators, then per 64-wide chunk of K load
    x (TM x 4 beats) and run r x TM cycles; store u."""
    mt, kc = _cdiv(rows, d.lora_tm), _cdiv(k, d.lora_lanes)
    return mt * (d.lora_tm * d.lora_max_r + kc * (d.lora_tm * 4 + r * d.lora_tm + LORA_DEPTH) + d.lora_tm * 4)


def lora_up_cycles(d: Design, rows: int, n: int) -> int:
    """qk_lora_up: per row tile load u, then one (n, row) pair per cycle."""
    mt = _cdiv(rows, d.lora_tm)
    return mt * (d.lora_tm * 4 + n * d.lora_tm + LORA_DEPTH)


@dataclass
class MatrixPlan:
    """How one matrix of a decode step is spread over the GEMV compute units."""

    name: str
    N: int
    K: int
    fmt: str
    k_groups: int
    n_groups: int
    rows_per_cu: int
    tiles_per_cu: int
    calls_per_cu: int
    core_us: float
    memory_us: float
    time_us: float
    bound: str
    partial_bytes: int
    bytes: float

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("core_us", "memory_us", "time_us"):
            d[k] = round(d[k], 3)
        return d


def plan_gemv(d: Design, name: str, N: int, K: int, bf16: bool, spw: int, cus: int, clock_hz: float,
              cu_gbps, scale_bytes: float = 4.0) -> MatrixPlan:
    """Best split of W [N, K] into k_groups (slices of K) x n_groups (slices of rows) over
    at most `cus` compute units; cu_gbps(used) is the memory bandwidth one CU gets when
    `used` CUs stream at once. k_groups > 1 leaves partial sums (2 x k_groups x N floats
    of extra traffic, charged to the reduction that follows)."""
    width = d.bf16_lanes if bf16 else d.lanes
    T = _cdiv(K, width)
    max_tiles = d.gemv_max_tiles * d.lanes // width
    best = None
    for k_groups in range(1, min(cus, T) + 1):
        n_groups = min(cus // k_groups, N)
        tiles_cu, rows_cu = _cdiv(T, k_groups), _cdiv(N, n_groups)
        row_calls, tile_calls = _cdiv(rows_cu, d.gemv_max_rows), _cdiv(tiles_cu, max_tiles)
        rows_call, tiles_call = _cdiv(rows_cu, row_calls), _cdiv(tiles_cu, tile_calls)
        calls = row_calls * tile_calls
        core = calls * (gemv_call_cycles(d, rows_call, tiles_call, bf16) + AXI_LATENCY) / clock_hz
        nbytes = calls * gemv_call_bytes(d, rows_call, tiles_call, spw, bf16, scale_bytes)
        mem = nbytes / (cu_gbps(k_groups * n_groups) * 1e9) + calls * AXI_LATENCY / clock_hz
        partial = 2 * 4 * N * k_groups if k_groups > 1 else 0
        t = max(core, mem)
        cand = MatrixPlan(name, N, K, "bf16" if bf16 else "4bit", k_groups, n_groups, rows_cu, tiles_cu, calls,
                          core * 1e6, mem * 1e6, t * 1e6, "memory" if mem >= core else "compute", partial,
                          round(nbytes * k_groups * n_groups))
        # partial sums cost their traffic at roughly the aggregate rate of the CUs
        score = t + partial / (cu_gbps(k_groups * n_groups) * 1e9 * k_groups * n_groups)
        if best is None or score < best[0]:
            best = (score, cand)
    return best[1]

