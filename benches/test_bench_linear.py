"""Fused 4-bit linear (GEMV and GEMM), the Phi-3-mini projections, one QLoRA layer
forward+backward, and thread scaling, each beside its peers in the same run."""
import pytest

from qlora_kernels import bench_linear as bl

GROUPS = [bl.linear_cases(1, 4096, 4096), bl.linear_cases(512, 4096, 4096), bl.linear_int8_cases(1, 4096, 4096),
          bl.linear_int8_cases(512, 4096, 4096)]
for name, (k, n) in bl.PHI3_SHAPES.items():
    GROUPS += [bl.linear_cases(1, k, n, f"phi3 {name}"), bl.linear_cases(512, k, n, f"phi3 {name}"),
               bl.linear_int8_cases(1, k, n, f"phi3 {name}")]
GROUPS += [bl.lora_layer_cases(512, 4096, 4096, 16, 32), bl.thread_scaling_cases(1), bl.thread_scaling_cases(512)]
CASES = [c for g in GROUPS for c in g]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c.group}-{c.name}" for c in CASES])
def test_linear(bench_case, i):
    c = CASES[i]
    if "M=1 " in c.group:
        # ~0.1 ms calls: 20 back-to-back calls per round, so that every implementation is
        # timed warm (single calls measured ORT's thread pool waking up, not its kernel).
        bench_case(c, rounds=15, iterations=20)
    else:
        bench_case(c, rounds=5)
