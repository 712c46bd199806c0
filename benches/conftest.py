"""Benchmarks run outside the default test run: ``python -m pytest benches``.
Every group holds our kernel and its peers on the same inputs; benches/report.py turns
a ``--benchmark-json`` file into docs/benchmarks.md with the ratios."""
import os

import pytest
import torch

# The peer "bitsandbytes" is stock bitsandbytes: our backend plugin stays out of this
# process (test_bench_bnb.py measures the plugin against stock in two worker processes).
os.environ["QLORA_KERNELS_BNB"] = "0"

# The AVX2 pairing (benches/avx2_pairing.sh) holds bitsandbytes to its AVX2 kernels too;
# that has to happen before anything imports it.
import bnb_isa  # noqa: E402 - benches/ is on sys.path (rootdir-relative import)

if bnb_isa.requested():
    print(bnb_isa.hold_to_avx2())


def pytest_configure(config):
    # Speed is reported at 2 threads (the project's reference machine) unless overridden.
    torch.set_num_threads(int(config.getoption("--bench-threads")))


def pytest_addoption(parser):
    parser.addoption("--bench-threads", default="2", help="torch/OpenMP threads for the benchmarks")


def run_case(benchmark, case, rounds: int = 7, iterations: int = 1):
    benchmark.group = case.group
    benchmark.name = case.name
    from qlora_kernels.bench import machine_summary

    benchmark.extra_info.update(ours=case.ours, work=case.work, unit=case.unit, machine=machine_summary(), **case.extra)
    benchmark.pedantic(case.fn, rounds=rounds, warmup_rounds=1, iterations=iterations)


@pytest.fixture
def bench_case(benchmark):
    return lambda case, rounds=7, iterations=1: run_case(benchmark, case, rounds, iterations)


def run_group(benchmark, cases, rounds: int = 7, calls: int = 1):
    """One group, ours and its peers timed in interleaved rounds (bench.interleave): the
    rows (median and spread per case, per-round ratios, fraction of the machine's limit)
    go to extra_info["interleaved"]; pytest-benchmark's own statistics are of our kernel
    alone, timed after the rounds."""
    from qlora_kernels import bench, peak

    try:
        times = bench.interleave(cases, rounds, calls)
        rows = bench.group_rows(cases, times, peak.measure())
        ours = next(c for c in cases if c.ours)
        benchmark.group = ours.group
        benchmark.name = ours.name
        benchmark.extra_info.update(ours=True, work=ours.work, unit=ours.unit, machine=bench.machine_summary(),
                                    interleaved=rows, rounds=rounds, calls=calls, peak=peak.measure().table())
        benchmark.pedantic(ours.fn, rounds=3, warmup_rounds=0, iterations=calls)
    finally:
        bench.release(cases)  # worker processes of cases that run in their own (training steps)


@pytest.fixture
def bench_group(benchmark):
    return lambda cases, rounds=7, calls=1: run_group(benchmark, cases, rounds, calls)
