"""Fused 4-bit linear (GEMV and GEMM) at 4096x4096, the Phi-3-mini and SmolLM2-135M
projections (M=1, 512, 2048), one QLoRA layer forward+backward, and thread scaling: each
group's cases (ours and the peers, same inputs) timed in interleaved rounds, with ratios
taken round by round and each row's fraction of this machine's measured limits."""
import pytest

from qlora_kernels import bench
from qlora_kernels.bench import linear as bl

GROUPS = [bl.linear_cases(1, 4096, 4096), bl.linear_cases(512, 4096, 4096), bl.linear_int8_cases(1, 4096, 4096),
          bl.linear_int8_cases(512, 4096, 4096)]
for name, (k, n) in bl.PHI3_SHAPES.items():
    GROUPS += [bl.linear_cases(1, k, n, f"phi3 {name}"), bl.linear_cases(512, k, n, f"phi3 {name}"),
               bl.linear_int8_cases(1, k, n, f"phi3 {name}")]
for name, (k, n) in bl.SMOLLM2_SHAPES.items():
    GROUPS += [bl.linear_cases(1, k, n, f"smollm2 {name}"), bl.linear_cases(512, k, n, f"smollm2 {name}"),
               bl.linear_cases(2048, k, n, f"smollm2 {name}")]
GROUPS += [bl.lora_layer_cases(512, 4096, 4096, 16, 32), bl.thread_scaling_cases(1), bl.thread_scaling_cases(512)]


@pytest.mark.parametrize("i", range(len(GROUPS)), ids=[g[0].group for g in GROUPS])
def test_linear(bench_group, i):
    g = GROUPS[i]
    bench_group(g, rounds=7, calls=bench.calls_per_round(g))
