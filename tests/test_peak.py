"""The machine-limit probes behind `qlora-kernels info --peak` and the benchmarks'
fraction-of-peak columns: they run on every CPU path this machine offers, refuse bad
arguments, and the level a working set streams from follows the cache sizes. (Their
values are measurements, judged in benchmarks, never here.)"""
import math

import pytest

from qlora_kernels import _C, peak


def test_fma_probe_runs_on_every_path():
    for isa in _C.supported_isas():
        g = _C.fma_peak_gflops(isa, 1, 0.002)
        assert math.isfinite(g) and g > 0, isa


def test_read_probe_and_bad_arguments():
    assert _C.read_bandwidth_gbs(1 << 16, 2, 0.002) > 0
    with pytest.raises(ValueError, match="bytes must be"):
        _C.read_bandwidth_gbs(100, 1, 0.01)
    with pytest.raises(ValueError, match="nthreads"):
        _C.fma_peak_gflops("scalar", 0, 0.01)
    with pytest.raises(ValueError, match="does not run the 'avx9' path"):
        _C.fma_peak_gflops("avx9", 1, 0.01)


def test_levels_follow_the_cache_sizes():
    p = peak.Peak(threads=2, fma_gflops={"scalar": 1.0}, bandwidth_gbs={"L2": 3.0, "L3": 2.0, "DRAM": 1.0},
                  buffer_bytes={"L2": 1, "L3": 1, "DRAM": 1}, caches={"L2": 512 << 10, "L3": 32 << 20})
    assert p.level_of(256 << 10) == "L2"          # within half of the two cores' L2
    assert p.level_of(4 << 20) == "L3"
    assert p.level_of(64 << 20) == "DRAM"
    frac, level = peak.stream_fraction(2 << 20, 2e-3, p)
    assert level == "L3" and frac == pytest.approx((2 << 20) / 2e-3 * 1e-9 / 2.0)
    # faster than DRAM can deliver: they were (partly) still in a cache, set against the next level up
    assert peak.stream_fraction(64 << 20, 0.1, p)[1] == "DRAM"   # 0.67 GB/s
    assert peak.stream_fraction(64 << 20, 0.04, p)[1] == "L3"    # 1.7 GB/s > DRAM's 1.0
    assert peak.stream_fraction(64 << 20, 0.01, p)[1] == "L2"    # 6.7 GB/s: above every level, the fastest
    assert peak.stream_fraction(64 << 20, 0.01, p)[0] == pytest.approx((64 << 20) / 0.01 * 1e-9 / 3.0)
    assert peak.gemm_fraction(0.5, "scalar", p) == 0.5 and peak.gemm_fraction(1.0, "avx2", p) is None
    assert "fp32 FMA peak" in p.table() and "DRAM" in p.table()


def test_cache_sizes_parse_sysfs():
    sizes = peak.cache_sizes()
    assert all(isinstance(v, int) and v > 0 for v in sizes.values())
    assert peak._size("512K") == 512 << 10 and peak._size("32M") == 32 << 20 and peak._size("64") == 64
