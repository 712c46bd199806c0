"""Resource estimates of the HLS kernels, counted from their design parameters.

Each compute unit (CU) is tallied from what its source instantiates: fp32 operators (the
unrolled lanes, trees and builders of hls/*.cpp), on-chip arrays (mapped to BRAM/URAM/M20K
by their depth and width), LUT-RAM tables, AXI ports and control. The per-operator costs
are typical figures, not synthesis results: replace them with a csynth report to refine."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .boards import Board
from .params import Design


@dataclass
class Resources:
    dsp: float = 0.0
    lut: float = 0.0
    ff: float = 0.0
    bram: float = 0.0  # BRAM36 or M20K, whichever the board has
    uram: float = 0.0

    def __add__(self, o: "Resources") -> "Resources":
        return Resources(self.dsp + o.dsp, self.lut + o.lut, self.ff + o.ff, self.bram + o.bram, self.uram + o.uram)

    def __mul__(self, k: float) -> "Resources":
        return Resources(self.dsp * k, self.lut * k, self.ff * k, self.bram * k, self.uram * k)

    __rmul__ = __mul__

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in asdict(self).items()}


# fp32 operators per family (one instance, fully pipelined at II=1).
#  * UltraScale+: Vitis HLS binds fadd to 2 DSP48E2 ("fulldsp") and fmul to 3 ("maxdsp");
#    LUT/FF are typical csynth figures at 300 MHz (+-30%).
#  * Versal: DSPFP32 mode does an fp32 multiply and an fp32 add in one DSP58 (AM004).
#  * Agilex 7: the variable-precision DSP block has native IEEE-754 fp32 multiply/add.
OP_COSTS: dict[str, dict[str, Resources]] = {
    "ultrascale+": {"fadd": Resources(dsp=2, lut=214, ff=227), "fmul": Resources(dsp=3, lut=135, ff=128)},
    "versal": {"fadd": Resources(dsp=1, lut=40, ff=70), "fmul": Resources(dsp=1, lut=40, ff=70)},
    "agilex7": {"fadd": Resources(dsp=1, lut=30, ff=60), "fmul": Resources(dsp=1, lut=30, ff=60)},
}
# A 512-bit m_axi master (burst engine, outstanding-read buffer) and the s_axilite/control
# block, per CU. Typical Vitis figures; assumptions.
WIDE_PORT = Resources(lut=1500, ff=2500, bram=1)
CONTROL = Resources(lut=1200, ff=1500)
LUTRAM_BITS_PER_LUT = 32  # simple dual-port distributed RAM (one write, one read port)


def bram_blocks(depth: int, width: int, board: Board) -> float:
    """Fewest block RAMs holding depth x width bits (BRAM18 halves count 0.5)."""
    if board.bram_kind == "M20K":
        shapes = [(512, 40, 1.0), (1024, 20, 1.0), (2048, 10, 1.0)]
    else:
        shapes = [(512, 72, 1.0), (1024, 36, 1.0), (2048, 18, 1.0), (4096, 9, 1.0), (512, 36, 0.5), (1024, 18, 0.5)]
    return min(c * math.ceil(width / w) * math.ceil(depth / d) for d, w, c in shapes)


def large_memory(depth: int, width: int, board: Board) -> Resources:
    """Deep buffers go to UltraRAM (4K x 72) where the device has it, else block RAM."""
    if board.urams:
        return Resources(uram=math.ceil(width / 72) * math.ceil(depth / 4096))
    return Resources(bram=bram_blocks(depth, width, board))


def lutram(bits: int) -> Resources:
    return Resources(lut=math.ceil(bits / LUTRAM_BITS_PER_LUT))


OPERATORS = ("vitis", "rtl")


def op_costs(board: Board, operators: str = "vitis") -> dict[str, tuple[Resources, str]]:
    """Per fp32 operator: its resources and where the figure comes from. "vitis": the
    typical csynth figures above (assumed); "rtl": the exact operators of hls/rtl as Yosys
    mapped them for UltraScale+ (measured; measured.py)."""
    if operators == "vitis":
        return {k: (v, f"assumed: typical Vitis HLS csynth figure for {board.family}")
                for k, v in OP_COSTS[board.family].items()}
    if operators == "rtl":
        if board.family != "ultrascale+":
            raise ValueError(f"operators='rtl': measured operator costs exist for UltraScale+ only (Yosys "
                             f"synth_xilinx -family xcup), not for {board.family}")
        from .measured import op_costs as measured

        return {k: (Resources(**r), src) for k, (r, src) in measured().items()}
    raise ValueError(f"operators must be one of {', '.join(OPERATORS)}, got {operators!r}")


def _ops(board: Board, fadd: int, fmul: int, operators: str = "vitis") -> Resources:
    c = op_costs(board, operators)
    return c["fadd"][0] * fadd + c["fmul"][0] * fmul


def gemv_ops(d: Design) -> tuple[int, int]:
    """(fadd, fmul) of qk_gemv_4bit: 4 trees of 16 byte-lane values, the scale datapath
    (3 adds, 7 multiplies), the accumulator, and the table builder."""
    tree = d.scale_slots * (d.byte_lanes // d.scale_slots - 1)
    return tree + 3 + 1 + d.build_adds, 7 + d.build_muls


def gemv_cu(d: Design, board: Board, operators: str = "vitis") -> Resources:
    fadd, fmul = gemv_ops(d)
    r = _ops(board, fadd, fmul, operators)
    r += Resources(bram=d.byte_lanes * bram_blocks(2 * d.pair_entries, 32, board))  # pair tables, two banks
    r += lutram(d.lanes * d.codes * 32)                                             # nibble products
    r += Resources(ff=2 * d.lanes * 32)                                             # x of two tiles, registers
    r += Resources(bram=16 * bram_blocks(d.gemv_max_rows // 16, 32, board))             # accumulators
    r += large_memory(d.prefetch_beats, d.word_bits, board)                          # weight FIFO
    r += large_memory(d.prefetch_beats, 32 * d.scale_slots, board)                  # scale FIFO
    r += Resources(lut=24 * d.byte_lanes + 64 * d.bf16_lanes, ff=64 * d.byte_lanes)  # lane addressing, bf16 exponents
    return r + WIDE_PORT * 3 + CONTROL  # weights, scales, and one port shared by x/codebook/y


def gemm_cu(d: Design, board: Board, operators: str = "vitis") -> Resources:
    """qk_gemm_4bit: 128 multipliers, 4 trees of 32, scale datapath, accumulator."""
    fadd = d.scale_slots * (d.group_min - 1) + 3 + 1
    r = _ops(board, fadd, d.lanes + 7, operators)
    r += large_memory(d.gemm_max_rows, 32, board) * d.gemm_tm                        # accumulators [TM][rows]
    r += lutram(d.lanes * d.gemm_tm * 32)                                            # x tile [TM][128]
    r += Resources(lut=16 * d.lanes, ff=32 * d.lanes)                                # codebook ROM per lane, codes
    return r + WIDE_PORT * 4 + CONTROL


def gemm_t_cu(d: Design, board: Board, operators: str = "vitis") -> Resources:
    """qk_gemm_4bit_t: 4 scale multipliers, 128 multiply-accumulate lanes."""
    r = _ops(board, d.lanes, d.lanes + d.scale_slots, operators)
    r += large_memory(d.gemm_max_rows, 32, board) * d.gemm_tm                        # dy tile [TM][rows]
    r += lutram(d.lanes * d.gemm_tm * 32)                                            # accumulators [TM][128]
    r += Resources(lut=16 * d.lanes, ff=32 * d.lanes)
    return r + WIDE_PORT * 4 + CONTROL


def lora_cus(d: Design, board: Board, operators: str = "vitis") -> Resources:
    """One qk_lora_down and one qk_lora_up: 64-lane dot products with 64-input trees."""
    down = _ops(board, d.lora_lanes, d.lora_lanes, operators) + lutram(d.lora_lanes * d.lora_tm * 32)
    down += Resources(bram=bram_blocks(d.lora_tm * d.lora_max_r, 32, board))
    up = _ops(board, d.lora_lanes + 1, d.lora_max_r + 1, operators) + lutram(d.lora_max_r * d.lora_tm * 32)
    return down + up + WIDE_PORT * 7 + CONTROL * 2


def decode_cu(d: Design, board: Board, operators: str = "vitis") -> Resources:
    return _ops(board, 0, d.decode_lanes, operators) + Resources(lut=16 * d.decode_lanes) + WIDE_PORT * 3 + CONTROL


def utilization(used: Resources, board: Board) -> dict[str, dict[str, float]]:
    """Used vs available (after the shell) per resource, in percent."""
    avail = board.available()
    out = {}
    for k, v in used.as_dict().items():
        a = avail[k]
        out[k] = {"used": v, "available": round(a), "percent": round(100.0 * v / a, 1) if a else (0.0 if v == 0 else
                                                                                                     float("inf"))}
    return out
