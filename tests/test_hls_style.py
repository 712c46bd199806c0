"""Conventions of the HLS sources: every loop labelled with its pragmas beside it, no
vendor header copied in, no codebook value typed into the kernels, files kept small."""
import re
from pathlib import Path

from qlora_kernels import formats

HLS = Path(__file__).resolve().parents[1] / "hls"
KERNEL_SOURCES = sorted(p for p in HLS.glob("*.*") if p.suffix in (".cpp", ".h"))
VENDOR = {"ap_int.h", "ap_fixed.h", "hls_stream.h", "ap_common.h", "ap_decl.h"}


def test_every_kernel_loop_is_labelled_and_has_a_pragma():
    for path in KERNEL_SOURCES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not re.match(r"\s*for \(", line):
                continue
            where = f"{path.name}:{i + 1}"
            assert re.match(r"\s*[a-z0-9_]+:\s*$", lines[i - 1]), f"{where}: loop without a label"
            assert lines[i + 1].strip().startswith("#pragma HLS"), f"{where}: loop without a pragma beside it"


def test_top_functions_use_the_vitis_interface_style():
    tops = 0
    for path in KERNEL_SOURCES:
        text = path.read_text()
        for name in re.findall(r'extern "C" void (qk_\w+)\(', text):
            tops += 1
            body = text[text.index(f'extern "C" void {name}('):]
            assert "#pragma HLS INTERFACE m_axi" in body and "s_axilite port=return" in body, name
            assert "#pragma HLS DATAFLOW" in body, name
    assert tops == 7


def test_no_vendor_header_is_copied_in():
    repo = HLS.parent
    assert not [p for p in repo.rglob("*") if p.name in VENDOR and ".git" not in p.parts]


def test_codebooks_are_not_typed_into_the_hls_sources():
    text = "".join(p.read_text() for p in HLS.rglob("*") if p.suffix in (".cpp", ".h"))
    for qt in formats.QUANT_TYPES:
        for v in formats.codebook(qt).tolist():
            if v not in (0.0, 1.0, -1.0):
                digits = f"{abs(v):.7f}"[2:7]  # e.g. 0.6961928 -> "69619"
                assert digits not in text, f"{qt} code {v} appears in hls/"


def test_files_stay_small():
    for path in list(HLS.rglob("*.cpp")) + list(HLS.rglob("*.h")):
        assert len(path.read_text().splitlines()) <= 400, path
