"""The HLS kernels' design parameters, mirrored from ``hls/qk_hls_params.h``.

The C++ header is the one place they are set; this mirror exists because an installed
package does not ship ``hls/``. ``tests/test_fpga_params.py`` parses the header and reads
the values compiled into ``qlora_kernels._hls`` and requires all three to agree, so the
performance model always describes the code that was tested."""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

PARAMS: dict[str, int] = {
    "QK_TARGET_CLOCK_MHZ": 300,
    "QK_WORD_BITS": 512,
    "QK_WORD_BYTES": 64,
    "QK_II": 1,
    "QK_LANES": 128,
    "QK_BYTE_LANES": 64,
    "QK_CODES": 16,
    "QK_PAIR_ENTRIES": 256,
    "QK_GROUP_MIN": 32,
    "QK_SCALE_SLOTS": 4,
    "QK_BUILD_MULS": 4,
    "QK_BUILD_ADDS": 16,
    "QK_BUILD_CYCLES": 1536,
    "QK_GEMV_MAX_ROWS": 8192,
    "QK_GEMV_MAX_TILES": 64,
    "QK_PREFETCH_BEATS": 1536,
    "QK_BF16_LANES": 32,
    "QK_BF16_MANT": 128,
    "QK_BF16_BUILD_CYCLES": 1024,
    "QK_GEMM_TM": 16,
    "QK_GEMM_MAX_ROWS": 4096,
    "QK_GEMM_MAX_TILES": 64,
    "QK_DECODE_LANES": 16,
    "QK_LORA_LANES": 64,
    "QK_LORA_MAX_R": 64,
    "QK_LORA_TM": 16,
}

_DEFINE = re.compile(r"^\s*#define\s+(QK_[A-Z0-9_]+)\s+(-?\d+)\b", re.MULTILINE)


def header_path() -> Path:
    """Where the header sits in a source checkout (src/qlora_kernels/fpga -> repo/hls)."""
    return Path(__file__).resolve().parents[3] / "hls" / "qk_hls_params.h"


def parse_header(text: str) -> dict[str, int]:
    """``#define QK_NAME <integer>`` lines of the header (include guards have no value)."""
    return {name: int(value) for name, value in _DEFINE.findall(text)}


def compiled_params() -> dict[str, int] | None:
    """The values compiled into qlora_kernels._hls, or None when it is not built."""
    try:
        from .. import _hls
    except ImportError:
        return None
    return dict(_hls.params())


@dataclass(frozen=True)
class Design:
    """The parameters under readable names, plus the quantities derived from them."""

    target_clock_mhz: int
    word_bits: int
    word_bytes: int
    ii: int
    lanes: int
    byte_lanes: int
    codes: int
    pair_entries: int
    group_min: int
    scale_slots: int
    build_muls: int
    build_adds: int
    build_cycles: int
    gemv_max_rows: int
    gemv_max_tiles: int
    prefetch_beats: int
    bf16_lanes: int
    bf16_mant: int
    bf16_build_cycles: int
    gemm_tm: int
    gemm_max_rows: int
    gemm_max_tiles: int
    decode_lanes: int
    lora_lanes: int
    lora_max_r: int
    lora_tm: int

    @classmethod
    def from_params(cls, params: dict[str, int]) -> "Design":
        return cls(**{f.name: int(params["QK_" + f.name.upper()]) for f in fields(cls)})

    def as_params(self) -> dict[str, int]:
        return {"QK_" + f.name.upper(): getattr(self, f.name) for f in fields(self)}

    def scales_per_beat(self, blocksize: int) -> int:
        return self.lanes // min(blocksize, self.lanes)


DESIGN = Design.from_params(PARAMS)
