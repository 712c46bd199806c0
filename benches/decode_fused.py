"""SmolLM2-135M-Instruct + LoRA r=16 on every projection (unmerged, as a fine-tuned model is
served), torch with a KV cache: ms per decoded token with and without the fused RMSNorm /
SwiGLU (``fuse_layers``), the two models' rounds interleaved (A B B A ...), after a
128-token prompt. docs/design.md ("Fused RMSNorm and SwiGLU", Inference) has the numbers.

    PYTHONPATH=src python benches/decode_fused.py [--rounds 4] [--new 64]"""
from __future__ import annotations

import argparse
import statistics

import torch

from qlora_kernels import quantize_model
from qlora_kernels.bench.genai import torch_runner
from qlora_kernels.bench.onnx import LLAMA, random_lora
from qlora_kernels.finetune.smollm2 import load_smollm2
from qlora_kernels.integrations.hf_fuse import fuse_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: random_lora(quantize_model(load_smollm2(), skip=("lm_head",)), LLAMA, r=16).eval()
              for name in ("unfused", "fused")}
    fuse_layers(models["fused"])
    runners = {name: torch_runner(m) for name, m in models.items()}
    prompt = list(range(100, 228))
    ms: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        for name in (("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")):
            _, decode_s, _ = runners[name](prompt, args.new)
            ms[name].append(decode_s / (args.new - 1) * 1e3)
    for name, v in ms.items():
        print(f"{name}: {statistics.median(v):.2f} ms/token [{min(v):.2f}-{max(v):.2f}] over {args.rounds} rounds")


if __name__ == "__main__":
    main()
