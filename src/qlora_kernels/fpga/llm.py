"""Transformer shapes for the estimate: a named model or a Hugging Face config.

Only the decoder's matrix shapes matter here. q/k/v share one input and are streamed as
one fused matrix, as are gate/up (Phi-3 stores them fused; for Llama-style checkpoints
this is a re-layout at load time, not extra work)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, N = out_features, K = in_features) of one decoder layer's matrices."""
        h, i, hd = self.hidden, self.intermediate, self.hd
        return [("qkv_proj", (self.heads + 2 * self.kv_heads) * hd, h), ("o_proj", h, self.heads * hd),
                ("gate_up_proj", 2 * i, h), ("down_proj", h, i)]

    @property
    def linear_params(self) -> int:
        """Parameters of the quantized decoder matrices (all layers)."""
        return self.layers * sum(n * k for _, n, k in self.linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        head = 0 if self.tied else self.embedding_params
        return self.linear_params + self.embedding_params + head + self.norm_params

    def kv_bytes_per_position(self, kv_bytes: int = 2) -> int:
        """K and V of one position, all layers (read once per decoded token)."""
        return 2 * self.layers * self.kv_heads * self.hd * kv_bytes


# microsoft/Phi-3-mini-4k-instruct config.json: 3.82B parameters, separate lm_head.
PHI3_MINI = ModelConfig("phi-3-mini", hidden=3072, intermediate=8192, layers=32, heads=32, kv_heads=32, vocab=32064)

MODELS: dict[str, ModelConfig] = {"phi-3-mini": PHI3_MINI}
_ALIASES = {"phi3-mini": "phi-3-mini", "phi3mini": "phi-3-mini", "phi-3-mini-4k-instruct": "phi-3-mini",
            "microsoft/phi-3-mini-4k-instruct": "phi-3-mini"}


def from_hf_config(cfg: Mapping[str, Any], name: str | None = None) -> ModelConfig:
    """A Hugging Face ``config.json`` as a dict (hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size)."""
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"model config: missing {missing} (a Hugging Face decoder config is expected)")
    def size(key: str, value) -> int:
        # every shape field is a count: 0 divided by zero in the model, a negative one gave
        # nonsense figures (a KV cache that made decoding faster)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value) or value < 1):
            raise ValueError(f"model config: {key} must be an integer >= 1, got {value!r}")
        return int(value)

    heads = size("num_attention_heads", cfg["num_attention_heads"])
    kv = cfg.get("num_key_value_heads")
    head_dim = cfg.get("head_dim")
    return ModelConfig(
        name=name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "custom"),
        hidden=size("hidden_size", cfg["hidden_size"]), intermediate=size("intermediate_size", cfg["intermediate_size"]),
        layers=size("num_hidden_layers", cfg["num_hidden_layers"]), heads=heads,
        kv_heads=heads if kv is None else size("num_key_value_heads", kv), vocab=size("vocab_size", cfg["vocab_size"]),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=None if head_dim is None else size("head_dim", head_dim))


def get_model(model: str | Mapping[str, Any] | ModelConfig | Path) -> ModelConfig:
    """A named model, a ModelConfig, a config dict, or the path of a config.json (or of
    the folder holding it)."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, Mapping):
        return from_hf_config(model)
    key = str(model)
    lowered = key.lower()
    if lowered in MODELS or lowered in _ALIASES:
        return MODELS[_ALIASES.get(lowered, lowered)]
    path = Path(key)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        with open(path) as f:
            return from_hf_config(json.load(f), name=path.parent.name if path.name == "config.json" else path.stem)
    raise ValueError(f"model: {key!r} is neither a known model {sorted(MODELS)} nor a config.json path")
