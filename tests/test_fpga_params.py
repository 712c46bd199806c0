"""The performance model's design parameters are the HLS code's: the mirror in
qlora_kernels.fpga.params equals hls/qk_hls_params.h and the values compiled into
qlora_kernels._hls."""
from pathlib import Path

from qlora_kernels.fpga import params

# The header of this checkout: the package may be installed elsewhere (a wheel in a venv),
# where params.header_path() has no hls/ beside it.
HEADER = Path(__file__).resolve().parents[1] / "hls" / "qk_hls_params.h"


def test_mirror_equals_the_header():
    path = HEADER
    assert path.is_file(), path
    assert params.parse_header(path.read_text()) == params.PARAMS


def test_mirror_equals_the_compiled_extension():
    compiled = params.compiled_params()
    assert compiled is not None, "qlora_kernels._hls is not built (setup.py always builds it)"
    assert compiled == params.PARAMS


def test_derived_parameters_are_consistent():
    d = params.DESIGN
    assert d.word_bytes * 8 == d.word_bits and d.lanes == 2 * d.word_bytes and d.byte_lanes == d.word_bytes
    assert d.build_cycles == d.lanes * d.codes // d.build_muls + d.byte_lanes * d.pair_entries // d.build_adds
    assert d.bf16_build_cycles == d.bf16_lanes * d.bf16_mant // d.build_muls
    assert d.scale_slots * d.group_min == d.lanes and d.prefetch_beats >= d.build_cycles
    assert [d.scales_per_beat(b) for b in (32, 64, 128, 4096)] == [4, 2, 1, 1]
    assert params.Design.from_params(d.as_params()) == d
