"""ONNX Runtime on the exported SmolLM2-135M (+ LoRA) beside our torch path: tokens/s for a
128-token prompt and for a single-token step (see qlora_kernels.bench.onnx). Exporting the
two files takes about two minutes before the first case. QK_BENCH_QUICK=1: 16-token prompt."""
import os

import pytest

from qlora_kernels.bench import onnx as bench_onnx

PROMPT = 16 if os.environ.get("QK_BENCH_QUICK") else 128
CASES = bench_onnx.onnx_cases(prompt=PROMPT)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c.group}-{c.name}" for c in CASES])
def test_onnx_serving(bench_case, i):
    c = CASES[i]
    bench_case(c, rounds=20 if "single-token" in c.group else 7)
