"""One training step (AdamW, LoRA r=16 on every projection, batch 2 x 256) on a random
Phi-3-architecture model and on SmolLM2-135M-Instruct, beside PEFT + bitsandbytes; our
DoRA step beside our LoRA step; the fused output head + loss alone beside transformers'
way; the fused RMSNorm, SwiGLU and RoPE alone beside transformers' and torch's; the fused causal
attention beside torch's scaled_dot_product_attention (causal, and a right-padded batch with
transformers' mask); LoRA's dropout mask beside torch's bernoulli_. Each group timed
in interleaved rounds (bench.interleave). Peak memory per configuration:
benches/train_memory.py."""
import pytest

from qlora_kernels import bench
from qlora_kernels.bench import train as bench_train

GROUPS = bench.groups_of(bench_train.loss_cases() + bench_train.norm_act_cases() + bench_train.attention_cases()
                         + bench_train.dropout_cases()
                         + bench_train.train_cases("phi3")
                         + bench_train.train_cases("smollm2"))


@pytest.mark.parametrize("i", range(len(GROUPS)), ids=[g[0].group for g in GROUPS])
def test_train_step(bench_group, i):
    bench_group(GROUPS[i], rounds=5)
