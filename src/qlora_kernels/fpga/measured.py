"""Numbers measured from the RTL in ``hls/rtl`` (``scripts/rtl_synth.py`` writes
``rtl_measured.json`` beside this module, with the tool versions): cells from Yosys'
UltraScale+ mapping and Fmax from nextpnr on an ECP5. The model uses them where one exists
(the fp32 operators, with ``Options(operators="rtl")``) and says so per number."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

MEASURED_FILE = Path(__file__).with_name("rtl_measured.json")

# Xilinx primitives Yosys emits, counted in the model's units: a LUT used as a 16/32-deep
# shift register is one LUT; RAM32M16 is the 8 LUTs of one slice (RAM32M: 4).
_LUT_EQUIV = {"SRL16E": 1, "SRLC32E": 1, "RAM32M16": 8, "RAM32M": 4, "RAM64M": 4, "RAM64M8": 8}


@functools.cache
def load() -> dict[str, Any]:
    return json.loads(MEASURED_FILE.read_text())


def cells_to_resources(cells: dict[str, int]) -> dict[str, float]:
    """The model's resource kinds (resources.Resources fields) of Yosys' cell counts."""
    lut = sum(v for k, v in cells.items() if k.startswith("LUT")) + sum(
        _LUT_EQUIV.get(k, 0) * v for k, v in cells.items())
    ff = sum(v for k, v in cells.items() if k.startswith("FD"))
    bram = cells.get("RAMB36E2", 0) + 0.5 * cells.get("RAMB18E2", 0)
    return {"dsp": cells.get("DSP48E2", 0), "lut": lut, "ff": ff, "bram": bram, "uram": cells.get("URAM288", 0)}


def tool(data: dict[str, Any] | None = None) -> str:
    return (data or load())["tools"]["yosys"]


def op_costs(data: dict[str, Any] | None = None) -> dict[str, tuple[dict[str, float], str]]:
    """fp32 add and multiply of the RTL (exact: subnormals, round to nearest even) on
    UltraScale+, with where each number comes from."""
    data = data or load()
    out = {}
    for op, unit, src in (("fadd", "fp32 adder", "qk_fadd.v"), ("fmul", "fp32 multiplier", "qk_fmul.v")):
        r = cells_to_resources(data["xcup"][unit]["cells"])
        out[op] = (r, f"measured: {tool(data)} synth_xilinx -family xcup of hls/rtl/{src}")
    return out
