"""Serving with a KV cache (issue 18): ONNX Runtime GenAI on our export_genai folders (bnb4
with our operator library, fp32 and int8 compute, and with ONNX Runtime's MatMulBnb4;
nbits) and on its own builder's int4 folder, our torch path, stock transformers +
bitsandbytes; SmolLM2-135M-Instruct, 128-token prompt, 128 new tokens, interleaved rounds
(qlora_kernels.bench.genai). The table goes to bench-results/genai.md and the raw times to
the benchmark's extra_info. QK_BENCH_QUICK=1: 16 + 16 tokens, 2 rounds."""
import os
from pathlib import Path

from qlora_kernels.bench import genai, machine_summary

QUICK = bool(os.environ.get("QK_BENCH_QUICK"))
PROMPT, NEW, ROUNDS = (16, 16, 2) if QUICK else (genai.PROMPT, genai.NEW, 3)


def test_genai_serving(benchmark):
    runners = genai.contenders()
    res = genai.measure(runners, rounds=ROUNDS, prompt_len=PROMPT, new=NEW)
    md = "\n\n".join(genai.table(res, ours, PROMPT, NEW) for ours in (genai.BUILDER, genai.NBITS, genai.OLD_TORCH))
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "genai.md").write_text(f"{machine_summary()}\n\n{md}\n", encoding="utf-8")
    print("\n" + md)
    # the native step computes what the model's own forward does: the same greedy tokens
    assert res["qlora-kernels torch + LoRA r16, native step"]["tokens"] == res[genai.OLD_TORCH]["tokens"]
    assert res["qlora-kernels torch, native step"]["tokens"] == res["qlora-kernels torch (KV cache)"]["tokens"]
    benchmark.group = "genai serving"
    benchmark.name = genai.NBITS
    benchmark.extra_info.update(machine=machine_summary(), prompt=PROMPT, new=NEW, rounds=ROUNDS,
                                times={n: {k: v for k, v in r.items() if k != "tokens"} for n, r in res.items()})
    ours = runners[genai.NBITS]
    benchmark.pedantic(lambda: ours(list(range(100, 108)), 4), rounds=1, warmup_rounds=0)
