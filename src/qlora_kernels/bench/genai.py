"""Serving SmolLM2-135M-Instruct (NF4 base, no adapter) token by token with a KV cache, five
ways on the same prompt (128 token ids) and the same length (128 new tokens, greedy, EOS
not allowed to end early):

- ONNX Runtime GenAI on our ``export_genai`` folders: ``bnb4`` (our very bytes, computed by
  our operator library's MatMul4bit with the dense head, by its MatMul4bitInt8 with an int4
  head as the builder makes them, and by ONNX Runtime's own MatMulBnb4) and ``nbits``
  (MatMulNBits int4, accuracy_level 4 = int8 compute, head included, as the builder does
  on CPU);
- ONNX Runtime GenAI on its own model builder's folder (``-p int4 -e cpu``) from the same
  base weights, the peer to beat;
- our torch path: transformers' Llama with our Linear4bit layers and its DynamicCache;
- stock transformers + bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True)``, NF4,
  bitsandbytes' own CPU kernels: benches/conftest.py keeps our plugin out).

Each round times the prompt and the decode of every contender once, the order rotating
from round to round (bench.harness.interleave's scheme), so the two groups' per-round
ratios cancel the shared machine's drift."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPT, NEW = 128, 128
# the torch path the native decode step is measured against (issue 18: >= 3x its rate)
OLD_TORCH = "qlora-kernels torch + LoRA r16 (KV cache)"
BNB4_OURS = "ORT GenAI, our bnb4 export (our MatMul4bit, fp32 head)"
BNB4_OURS_HEAD = "ORT GenAI, our bnb4 export (our MatMul4bit, int4 head, fp32 compute)"
BNB4_OURS_INT8 = "ORT GenAI, our bnb4 export (our MatMul4bitInt8, int4 head, as the builder)"
BNB4_ORT = "ORT GenAI, our bnb4 export (ORT's MatMulBnb4, fp32 head)"
NBITS = "ORT GenAI, our nbits export"
BUILDER = "ORT GenAI builder int4"


def _og_runner(folder: Path):
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def run(prompt: list, new: int) -> tuple[float, float, list]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        toks = []
        while not gen.is_done():
            gen.generate_next_token()
            toks.append(int(gen.get_next_tokens()[0]))
        return t1 - t0, time.perf_counter() - t1, toks

    return run


def torch_runner(model, native: bool = False):
    """Greedy decode through the model's forward with transformers' DynamicCache, or with
    ``native``: our native decode step (integrations.hf_decode) over a StaticCache."""
    if native:
        from ..integrations.hf_decode import enable_native_decode

        enable_native_decode(model)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model

    def run(prompt: list, new: int) -> tuple[float, float, list]:
        from transformers import DynamicCache, StaticCache

        ids = torch.tensor([prompt])
        with torch.no_grad():
            t0 = time.perf_counter()
            cache = StaticCache(config=lm.config, max_cache_len=len(prompt) + new) if native else DynamicCache()
            out = model(input_ids=ids, cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            toks = [int(nxt)]
            past = out.cache
            for _ in range(new - 1):
                out = model(input_ids=nxt, cache=past, use_cache=True)
                past, nxt = out.cache, out.logits[:, -1:].argmax(-1)
                toks.append(int(nxt))
        return t1 - t0, time.perf_counter() - t1, toks

    return run


def builder_folder(hf_dir: Path, out: Path) -> Path:
    """ONNX Runtime GenAI's own model builder, int4 for the CPU, from the base's HF folder."""
    if (out / "genai_config.json").is_file():
        return out
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(out.parent / "builder-cache")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not (out / "genai_config.json").is_file():
        raise RuntimeError(f"the ONNX Runtime GenAI builder failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return out


def contenders(workdir: str | None = None, peers: bool = True) -> dict:
    """name -> runner(prompt, new) -> (prompt seconds, decode seconds, tokens)."""
    from .. import quantize_model
    from ..finetune.smollm2 import load_smollm2, smollm2_hf_dir
    from ..integrations.onnx import export_genai

    d = Path(workdir or tempfile.mkdtemp(prefix="qk-bench-genai-"))
    ours = quantize_model(load_smollm2(), skip=("lm_head",)).eval()
    run = {}
    # (name, folder, export_genai arguments); the builder's int4 quantizes the head and
    # computes in int8: the second bnb4 folder makes the same two choices on our exact bytes
    folders = ((BNB4_OURS, "ours-bnb4-ops", dict(weight_format="bnb4", custom_ops=True)),
               (BNB4_OURS_HEAD, "ours-bnb4-ops-head", dict(weight_format="bnb4", custom_ops=True, quantize_head=True)),
               (BNB4_OURS_INT8, "ours-bnb4-ops-int8", dict(weight_format="bnb4", custom_ops=True, accuracy_level=4,
                                                             quantize_head=True)),
               (BNB4_ORT, "ours-bnb4", dict(weight_format="bnb4", custom_ops=False)),
               (NBITS, "ours-nbits", dict(weight_format="nbits", accuracy_level=4)))
    for name, sub, kw in folders:
        folder = d / sub
        if not (folder / "genai_config.json").is_file():
            export_genai(ours, folder, verify_output=False, log=None, **kw)
        run[name] = _og_runner(folder)
    run["qlora-kernels torch (KV cache)"] = torch_runner(ours)
    from .onnx import LLAMA, random_lora

    # the torch path as a fine-tuned model is served: the LoRA layers left unmerged (r=16 on
    # every projection, docs/onnx.md's earlier one-token step measured this model)
    torch.manual_seed(0)  # PEFT draws A from torch's generator: the native step's model gets the same adapter
    lora = random_lora(quantize_model(load_smollm2(), skip=("lm_head",)), LLAMA, r=16)
    run[OLD_TORCH] = torch_runner(lora)
    # the same two models with the native decode step (csrc/decode.h) over a StaticCache
    run["qlora-kernels torch, native step"] = torch_runner(quantize_model(load_smollm2(), skip=("lm_head",)).eval(),
                                                           native=True)
    torch.manual_seed(0)
    lora = random_lora(quantize_model(load_smollm2(), skip=("lm_head",)), LLAMA, r=16)
    run["qlora-kernels torch + LoRA r16, native step"] = torch_runner(lora, native=True)
    if peers:
        run[BUILDER] = _og_runner(builder_folder(smollm2_hf_dir(), d / "builder-int4"))
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = AutoModelForCausalLM.from_pretrained(
            smollm2_hf_dir(), dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32),
            device_map="cpu").eval()
        run["transformers + bitsandbytes"] = torch_runner(bnb)
    return run


def measure(runners: dict, rounds: int = 3, prompt_len: int = PROMPT, new: int = NEW, seed: int = 0) -> dict:
    """{name: {"prompt": [s...], "decode": [s...], "tokens": first round's tokens}} over
    interleaved rounds (one warm-up of every contender first, on a short run)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, 49000, (prompt_len,), generator=g).tolist()
    names = list(runners)
    for n in names:
        runners[n](prompt[:8], 2)
    out = {n: {"prompt": [], "decode": [], "tokens": None} for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            tp, td, toks = runners[n](prompt, new)
            out[n]["prompt"].append(tp)
            out[n]["decode"].append(td)
            if out[n]["tokens"] is None:
                out[n]["tokens"] = toks
    return out


def table(results: dict, ours: str = NBITS, prompt_len: int = PROMPT, new: int = NEW) -> str:
    """Markdown: tokens/s (median, spread) per contender and its per-round ratio to ``ours``."""
    lines = ["| contender | prompt tokens/s (median, min-max) | decode tokens/s (median, min-max) | "
             f"decode vs {ours} (per-round ratio of tokens/s) |", "|---|---|---|---|"]
    for name, r in results.items():
        p = [prompt_len / s for s in r["prompt"]]
        dd = [new / s for s in r["decode"]]
        ratio = [a / b for a, b in zip(dd, [new / s for s in results[ours]["decode"]])]
        lines.append(f"| {name} | {np.median(p):.0f} ({min(p):.0f}-{max(p):.0f}) | {np.median(dd):.1f} "
                     f"({min(dd):.1f}-{max(dd):.1f}) | {np.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) |")
    return "\n".join(lines)
