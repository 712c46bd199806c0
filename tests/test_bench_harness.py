"""The benchmark harness: interleaved rounds with a rotating order, ratios taken round by
round, fractions of the machine's limits (on synthetic timings; no speed is judged here)."""
import pytest

from qlora_kernels import bench, peak


def _cases(log):
    return [bench.Case("g", name, (lambda n=name: log.append(n)), name == "ours", 2e9, "GFLOP/s")
            for name in ("ours", "p1", "p2")]


def test_rounds_interleave_with_a_rotating_order():
    log = []
    times = bench.interleave(_cases(log), rounds=3, calls=2)
    assert log[:3] == ["ours", "p1", "p2"]  # warm-up
    assert log[3:] == ["ours"] * 2 + ["p1"] * 2 + ["p2"] * 2 + ["p1"] * 2 + ["p2"] * 2 + ["ours"] * 2 \
        + ["p2"] * 2 + ["ours"] * 2 + ["p1"] * 2
    assert all(len(v) == 3 for v in times.values())


def test_ratios_are_taken_round_by_round():
    cases = _cases([])
    # a machine that slows down 3x in round 2 for everyone: per-round ratios stay 0.5
    times = {"ours": [1.0, 3.0, 1.0], "p1": [2.0, 6.0, 2.0], "p2": [1.0, 3.0, 4.0]}
    rows = {r["name"]: r for r in bench.group_rows(cases, times)}
    assert rows["p1"]["ratio"] == 0.5 and rows["p1"]["ratio_min"] == rows["p1"]["ratio_max"] == 0.5
    assert rows["p2"]["ratio"] == 1.0 and rows["p2"]["ratio_min"] == 0.25
    assert rows["ours"]["median_s"] == 1.0 and rows["ours"]["max_s"] == 3.0 and "ratio" not in rows["ours"]
    assert "| g | p1 | 2000.00 [2000.00-6000.00] |" in bench.format_table(list(rows.values()))


def test_fractions_of_the_machine_limits():
    p = peak.Peak(threads=2, fma_gflops={"scalar": 10.0, "avx2": 100.0}, bandwidth_gbs={"L3": 50.0, "DRAM": 10.0},
                  buffer_bytes={"L3": 1, "DRAM": 1}, caches={"L3": 32 << 20})
    gemm = bench.Case("g", "peer", lambda: None, False, 50e9, "GFLOP/s")
    assert bench.harness.limit_fraction(gemm, 1.0, p) == {"fraction": 0.5, "limit": "avx2 FMA peak"}
    gemv = bench.Case("g", "peer", lambda: None, False, 1e9, "GFLOP/s", {"stream_bytes": 5 << 20})
    f = bench.harness.limit_fraction(gemv, 1e-3, p)
    assert f["limit"] == "L3 bandwidth" and f["fraction"] == pytest.approx((5 << 20) / 1e-3 * 1e-9 / 50.0)
