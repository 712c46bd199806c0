"""bitsandbytes with our backend plugin against stock bitsandbytes, the same bitsandbytes
code path otherwise: two worker processes (benches/bnb_worker.py) stay alive side by side,
one with QLORA_KERNELS_BNB=1 and one with =0, build the same seeded cases, and are asked for
rounds in turn (ours, stock, stock, ours, ...), each round timed inside its process. The
rows are the usual interleaved ones (median, spread, per-round ratio ours / stock).

    python -m pytest benches/test_bench_bnb.py --benchmark-json=bench-results/bnb.json"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_kernels import bench

import bnb_worker  # benches/ is on sys.path (pytest rootdir-relative import)

HERE = Path(__file__).resolve().parent
# Calls per round: enough that a round of the short cases lasts milliseconds.
CALLS = {"F.quantize_4bit 4096x4096 NF4": 1, "F.dequantize_4bit 4096x4096 NF4 (fp32)": 3,
         "Linear4bit fwd+bwd 512 rows 4096->4096 (train, frozen weight)": 1,
         "Linear4bit forward 1 row 4096->4096 (eval, no grad)": 20,
         "Linear4bit forward 512 rows 4096->4096 (eval, no grad)": 1,
         "PEFT QLoRA train step, load_in_4bit Llama 6x576, 2x256": 1}
OURS, STOCK = "bitsandbytes + qlora-kernels plugin", "stock bitsandbytes (CPU)"


class Worker:
    def __init__(self, plugin: bool, threads: int):
        env = dict(os.environ, QLORA_KERNELS_BNB="1" if plugin else "0", PYTHONPATH=os.pathsep.join(sys.path))
        self.p = subprocess.Popen([sys.executable, str(HERE / "bnb_worker.py"), str(threads)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)

    def time(self, case: str, calls: int) -> float:
        self.p.stdin.write(json.dumps({"case": case, "calls": calls}) + "\n")
        self.p.stdin.flush()
        reply = json.loads(self.p.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"{case}: {reply['error']}")
        return reply["seconds"]

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


@pytest.fixture(scope="module")
def workers(request):
    threads = int(request.config.getoption("--bench-threads"))
    pair = {True: Worker(True, threads), False: Worker(False, threads)}
    yield pair
    for w in pair.values():
        w.close()


@pytest.mark.parametrize("case", list(bnb_worker.CASES))
def test_bnb_plugin(benchmark, workers, case):
    rounds, calls = 7, CALLS[case]
    times = {OURS: [], STOCK: []}
    for side in (True, False):  # build and warm up both before the first timed round
        workers[side].time(case, 1)
    for r in range(rounds):
        for side in ((True, False) if r % 2 == 0 else (False, True)):
            times[OURS if side else STOCK].append(workers[side].time(case, calls))
    cases = [bench.Case(case, OURS, lambda: None, True), bench.Case(case, STOCK, lambda: None, False)]
    rows = bench.group_rows(cases, times)
    benchmark.group, benchmark.name = case, OURS
    benchmark.extra_info.update(ours=True, machine=bench.machine_summary(), interleaved=rows, rounds=rounds,
                                calls=calls)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
