"""What the decoder export needs to know about a Hugging Face causal LM: its family, sizes,
rotary tables, and where each projection lives. Two families are written: Llama (separate
q/k/v and gate/up projections; SmolLM2, Llama 2/3, Mistral-style GQA) and Phi-3 (packed
``qkv_proj`` and ``gate_up_proj``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ExportError

# config.model_type -> family; ONNX Runtime GenAI's "type" is the family name
SUPPORTED = {"llama": "llama", "phi3": "phi3"}


@dataclass(frozen=True)
class Arch:
    family: str                # "llama" | "phi3"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_size: int
    intermediate: int
    vocab: int
    eps: float
    context_length: int
    tied_head: bool
    bos_token_id: int | None
    eos_token_id: list
    pad_token_id: int | None
    sliding_window: int = -1  # GroupQueryAttention's local_window_size; -1: full attention

    def projections(self, i: int) -> dict:
        """{role: module path relative to the causal LM} of layer i."""
        p = f"model.layers.{i}"
        if self.family == "phi3":
            return {"qkv": f"{p}.self_attn.qkv_proj", "o": f"{p}.self_attn.o_proj",
                    "gate_up": f"{p}.mlp.gate_up_proj", "down": f"{p}.mlp.down_proj"}
        return {"q": f"{p}.self_attn.q_proj", "k": f"{p}.self_attn.k_proj", "v": f"{p}.self_attn.v_proj",
                "o": f"{p}.self_attn.o_proj", "gate": f"{p}.mlp.gate_proj", "up": f"{p}.mlp.up_proj",
                "down": f"{p}.mlp.down_proj"}


def core_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def _ids(value) -> list:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def read(model: torch.nn.Module) -> Arch:
    lm = core_model(model)
    cfg = getattr(lm, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise ExportError(f"model type {kind!r} ({type(lm).__name__}) is not supported by the ONNX Runtime GenAI "
                          f"export; supported: {', '.join(sorted(SUPPORTED))} (Llama family incl. SmolLM2, Phi-3)")
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_size = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    if kind == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(cfg, flag, False):
                raise ExportError(f"config.{flag}=True is not supported by the GenAI export (Llama without biases)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"config.hidden_act={cfg.hidden_act!r}: the GenAI export writes SiLU MLPs only")
    # Phi-3 (Phi-3-mini-4k: 2047 of 4096) attends to the last sliding_window keys, the token's
    # own included, which is GroupQueryAttention's local_window_size exactly (tested, as
    # GenAI's builder writes it). Llama ignores the key in transformers, so it does here too.
    window = int(getattr(cfg, "sliding_window", None) or -1) if kind == "phi3" else -1
    gen = getattr(lm, "generation_config", None)
    eos = _ids(getattr(gen, "eos_token_id", None)) or _ids(cfg.eos_token_id)
    bos = getattr(gen, "bos_token_id", None)
    bos = cfg.bos_token_id if bos is None else bos
    pad = getattr(cfg, "pad_token_id", None)
    return Arch(family=SUPPORTED[kind], layers=int(cfg.num_hidden_layers), hidden=int(cfg.hidden_size), heads=heads,
                kv_heads=kv, head_size=head_size, intermediate=int(cfg.intermediate_size),
                vocab=int(cfg.vocab_size), eps=float(cfg.rms_norm_eps), context_length=int(cfg.max_position_embeddings),
                tied_head=bool(getattr(cfg, "tie_word_embeddings", False)),
                bos_token_id=None if bos is None else int(bos), eos_token_id=eos,
                pad_token_id=(eos[0] if eos else None) if pad is None else int(pad),
                sliding_window=window if 0 < window < int(cfg.max_position_embeddings) else -1)


def rotary_tables(model: torch.nn.Module, arch: Arch) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [context_length, head_size / 2] from the model's own rotary module (so
    every rope_type transformers computes statically — default, linear, llama3, yarn —
    comes out as the model computes it). GroupQueryAttention rotates the two halves of a
    head (rotate_half, not interleaved), which is the HF layout: the table's second half
    must repeat its first, else the model is refused."""
    lm = core_model(model)
    rope = getattr(getattr(lm, "model", None), "rotary_emb", None)
    if rope is None:
        raise ExportError(f"{type(lm).__name__} has no model.rotary_emb: cannot build the rotary tables")
    rope_type = getattr(rope, "rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        # their tables change with the sequence length; GroupQueryAttention takes one table
        raise ExportError(f"rope_type {rope_type!r} is not supported by the GenAI export (its table depends on the "
                          "sequence length)")
    n = arch.context_length
    with torch.no_grad():
        probe = torch.zeros(1, 1, arch.head_size, dtype=torch.float32)
        cos, sin = rope(probe, torch.arange(n).unsqueeze(0))
    cos, sin = cos[0].float(), sin[0].float()
    half = arch.head_size // 2
    if cos.shape[-1] != arch.head_size:
        raise ExportError(f"partial rotary embeddings ({cos.shape[-1]} of {arch.head_size} dims) are not supported")
    if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        raise ExportError("the model's rotary table is not in the rotate-half layout GroupQueryAttention expects")
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()
