"""One training step (AdamW, LoRA r=16 on every projection, batch 2 x 256) on a random
Phi-3-architecture model and on SmolLM2-135M-Instruct, beside PEFT + bitsandbytes; our
DoRA step beside our LoRA step; the fused output head + loss alone beside transformers'
way. Peak memory per configuration: benches/train_memory.py."""
import pytest

from qlora_kernels import bench_train

CASES = bench_train.loss_cases() + bench_train.train_cases("phi3") + bench_train.train_cases("smollm2")


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c.group}-{c.name}" for c in CASES])
def test_train_step(bench_case, i):
    bench_case(CASES[i], rounds=5)
