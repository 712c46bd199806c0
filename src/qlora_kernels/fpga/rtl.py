"""The RTL of the decode datapath (hls/rtl/): its parameter header generated from
hls/qk_hls_params.h (one definition), a Verilator build of the decode unit, and golden-data
runs against the reference backend. Used by tests/test_rtl.py and scripts/rtl_synth.py;
needs a source checkout (the RTL is not in the wheel) and ``verilator`` on PATH."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .params import header_path, parse_header

GENERATED = "// Generated from hls/qk_hls_params.h by qlora_kernels.fpga.rtl.params_vh(): do not edit.\n"


def rtl_dir() -> Path:
    """hls/rtl of the source checkout this package was imported from; a caller with the
    package installed elsewhere (a wheel in a venv) passes its checkout's folder instead."""
    return header_path().parent / "rtl"


def params_vh(header_text: str | None = None) -> str:
    """hls/rtl/qk_params.vh: every ``QK_*`` value of the HLS header as a Verilog define."""
    text = header_path().read_text() if header_text is None else header_text
    lines = [GENERATED, "`ifndef QK_PARAMS_VH\n", "`define QK_PARAMS_VH\n"]
    lines += [f"`define {name} {value}\n" for name, value in parse_header(text).items()]
    lines.append("`endif\n")
    return "".join(lines)


def _hex(a, dtype, view) -> list[str]:
    """The harnesses' input: an array's 32-bit words in hex."""
    return [f"{v:x}" for v in np.ascontiguousarray(a, dtype).reshape(-1).view(view)]


def sources(d: Path | None = None) -> list[Path]:
    d = rtl_dir() if d is None else Path(d)
    return [d / "qk_fmul.v", d / "qk_fadd.v", d / "qk_scale_seq.v", d / "qk_decode_unit.v", d / "qk_decode_top.v",
            d / "qk_delay.v", d / "qk_fadd_tree.v", d / "qk_gemv_unit.v"]


def _verilate(top: str, harness: str, extra: list[Path], out_dir: Path, d: Path, args: list[str]) -> Path:
    verilator = shutil.which("verilator")
    if verilator is None:
        raise RuntimeError("verilator is not installed (scripts/setup.sh installs it: apt-get install verilator)")
    out_dir = Path(out_dir)
    cmd = [verilator, "--cc", "--exe", "--build", "-O3", "-Wno-fatal", "--top-module", top, f"-I{d}",
           "--Mdir", str(out_dir), "-o", harness, "-j", str(max(1, min(2, os.cpu_count() or 1))), *args]
    cmd += [str(p) for p in sources(d) + extra] + [str(d / "tb" / f"{harness}.cpp")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out_dir / harness


def build_decode(out_dir: Path, lanes: int | None = None, d: Path | None = None) -> Path:
    """Verilates qk_decode_top (the RTL in ``d``, default rtl_dir()) with its C++ harness;
    returns the executable. ``lanes`` overrides QK_DECODE_LANES (a multiple of 8)."""
    d = rtl_dir() if d is None else Path(d)
    return _verilate("qk_decode_top", "tb_decode", [], out_dir, d, [] if lanes is None else [f"-GLANES={lanes}"])


def build_fp(out_dir: Path, d: Path | None = None) -> Path:
    """Verilates qk_fadd and qk_fmul side by side (tb/qk_fp_tb_top.v) with their harness."""
    d = rtl_dir() if d is None else Path(d)
    return _verilate("qk_fp_tb_top", "tb_fp", [d / "tb" / "qk_fp_tb_top.v"], out_dir, d, [])


def run_fp(exe: Path, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a + b, a * b) elementwise in the RTL operators, as float32 arrays."""
    a32 = np.ascontiguousarray(a, np.float32).view(np.uint32)
    b32 = np.ascontiguousarray(b, np.float32).view(np.uint32)
    text = f"{len(a32):x} " + " ".join(f"{x:x} {y:x}" for x, y in zip(a32, b32))
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True).stdout.split()
    words = np.array([int(w, 16) for w in out], dtype=np.uint32).reshape(-1, 2)
    return words[:, 0].view(np.float32), words[:, 1].view(np.float32)


def build_gemv(out_dir: Path, lanes: int, group: int, max_tiles: int = 16, max_rows: int = 64,
               d: Path | None = None) -> Path:
    """Verilates qk_gemv_unit at a (small) configuration with its harness."""
    d = rtl_dir() if d is None else Path(d)
    return _verilate("qk_gemv_unit", "tb_gemv", [], out_dir, d,
                     [f"-GLANES={lanes}", f"-GGROUP={group}", f"-GMAX_TILES={max_tiles}", f"-GMAX_ROWS={max_rows}"])


def gemv_latency(lanes: int, group: int) -> int:
    """Cycles from a beat's input to its sum written back (qk_gemv_unit.v: lookup, product,
    slot tree, scale, slot-sum tree, accumulator read and add)."""
    lg, ls = (group.bit_length() - 1), ((lanes // group).bit_length() - 1)
    return 1 + 8 + 6 * lg + 8 + 6 * ls + 1 + 6


def run_gemv(exe: Path, codebook: np.ndarray, x: np.ndarray, codes: np.ndarray, scales: np.ndarray, rows: int,
             lanes: int) -> tuple[np.ndarray, int]:
    """codes: uint8 [tiles*rows, lanes/2] (beats tile-major), scales: float32 [tiles*rows,
    slots], x: float32 [tiles*lanes]. Returns (y float32 [rows], cycles)."""
    tiles = len(x) // lanes
    words = [f"{rows:x}", f"{tiles:x}"]
    words += _hex(codebook, np.float32, np.uint32) + _hex(x, np.float32, np.uint32)
    cw = np.ascontiguousarray(codes, np.uint8).reshape(len(codes), -1).view("<u4")
    sw = np.ascontiguousarray(scales, np.float32).reshape(len(scales), -1).view(np.uint32)
    for c, s in zip(cw, sw):
        words += _hex(c, np.uint32, np.uint32) + _hex(s, np.uint32, np.uint32)
    out = subprocess.run([str(exe)], input=" ".join(words), capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "cycles"
    return np.array([int(w, 16) for w in out[2:]], dtype=np.uint32).view(np.float32), int(out[1])


@dataclass
class DecodeCase:
    codebook: np.ndarray   # 16 float32
    codes: np.ndarray      # uint8 packed bytes, LANES/2 per beat
    absmax: np.ndarray     # float32, one per block
    beats_per_block: int


@dataclass
class DecodeRun:
    values: np.ndarray  # float32 [beats * LANES]
    cycles: int         # first beat in to last beat out
    latency: int        # first beat in to first beat out


def run_decode(exe: Path, cases: list[DecodeCase], lanes: int) -> list[DecodeRun]:
    words = [f"{len(cases):x}"]
    for c in cases:
        beats = len(c.codes) * 2 // lanes
        words += [f"{c.beats_per_block:x}", f"{beats:x}", f"{len(c.absmax):x}"]
        words += (_hex(c.codebook, np.float32, np.uint32) + _hex(c.codes, np.uint8, "<u4")
                  + _hex(c.absmax, np.float32, np.uint32))
    out = subprocess.run([str(exe)], input=" ".join(words), capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    runs, i = [], 0
    for c in cases:
        beats = len(c.codes) * 2 // lanes
        _, cycles, latency = lines[i].split()
        vals = np.array([int(w, 16) for line in lines[i + 1:i + 1 + beats] for w in line.split()], dtype=np.uint32)
        runs.append(DecodeRun(vals.view(np.float32), int(cycles), int(latency)))
        i += 1 + beats
    return runs


def synth_cells(top: str, params: dict[str, int] | None = None, family: str = "xcup",
                timeout: float = 900, d: Path | None = None) -> dict[str, int]:
    """Synthesizes ``top`` with Yosys for a Xilinx family (``synth_xilinx -family``;
    xcup = UltraScale+) and returns its cell counts by primitive (LUT6, FDRE, DSP48E2, ...),
    summed over the hierarchy. The hierarchy is kept: flattened, 16 lanes took Yosys 0.23
    past 20 GB (each multiplier is mapped once, then counted per instance)."""
    import json
    import tempfile

    yosys = shutil.which("yosys")
    if yosys is None:
        raise RuntimeError("yosys is not installed (scripts/setup.sh installs it: apt-get install yosys)")
    d = rtl_dir() if d is None else Path(d)
    files = " ".join(str(p) for p in sources(d))
    chparam = "".join(f" -set {k} {v}" for k, v in (params or {}).items())
    with tempfile.TemporaryDirectory() as tmp:
        stat = Path(tmp) / "stat.json"
        script = (f"read_verilog -I{d} {files}; " + (f"chparam{chparam} {top}; " if chparam else "") +
                  f"synth_xilinx -family {family} -top {top}; tee -q -o {stat} stat -json")
        subprocess.run([yosys, "-q", "-p", script], check=True, capture_output=True, text=True, timeout=timeout)
        # Yosys 0.23's stat -json interleaves the text listing of a hierarchy of parametrized
        # modules ("  qk_fadd   16" lines, no quotes or braces) with the JSON: drop those
        text = "\n".join(line for line in stat.read_text().splitlines() if any(c in line for c in '"{}[]'))
        design = json.loads(text)["design"]
    return {k: int(v) for k, v in design.get("num_cells_by_type", {}).items()}
