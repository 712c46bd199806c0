"""quantize_4bit / dequantize_4bit, 4096 x 4096, NF4 and FP4, beside bitsandbytes."""
import pytest

from qlora_kernels import bench

CASES = {qt: bench.quant_cases(4096, 4096, qt, 64) for qt in ("nf4", "fp4")}
IDS = [(qt, i) for qt in CASES for i in range(len(CASES[qt]))]


@pytest.mark.parametrize("qt,i", IDS, ids=[f"{qt}-{CASES[qt][i].group}-{CASES[qt][i].name}" for qt, i in IDS])
def test_quant(bench_case, qt, i):
    bench_case(CASES[qt][i])
