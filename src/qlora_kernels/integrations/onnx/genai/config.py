"""``genai_config.json`` and the tokenizer files of an ONNX Runtime GenAI model folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import ExportError
from .arch import Arch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def genai_config(arch: Arch, filename: str, search: dict | None = None, custom_ops_library: str | None = None) -> dict:
    """The folder's configuration, in the layout ONNX Runtime GenAI's model builder writes.
    Greedy search by default (``do_sample`` false), as transformers' generate without a
    generation config; ``past_present_share_buffer`` lets GroupQueryAttention write each
    new key/value into one buffer of the full context instead of copying the cache per token.
    ONNX Runtime logs errors only (``log_severity_level`` 3): each adapter input has an
    initializer as its default (the empty adapter), and ONNX Runtime warns once per such
    input at load — hundreds of lines that say nothing wrong. ``custom_ops_library``: a file
    in the folder (GenAI accepts only paths inside the model's folder) that ONNX Runtime
    loads for the decoder's custom operators."""
    s = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
         "max_length": arch.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
         "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
         "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    s.update(search or {})
    eos = arch.eos_token_id
    session = {"log_id": "onnxruntime-genai", "log_severity_level": 3, "provider_options": []}
    if custom_ops_library:
        session["custom_ops_library"] = custom_ops_library
    return {
        "model": {
            "bos_token_id": arch.bos_token_id,
            "context_length": arch.context_length,
            "decoder": {
                "session_options": session,
                "filename": filename,
                "head_size": arch.head_size,
                "hidden_size": arch.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": arch.heads,
                "num_hidden_layers": arch.layers,
                "num_key_value_heads": arch.kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": arch.pad_token_id,
            "type": arch.family,
            "vocab_size": arch.vocab,
        },
        "search": s,
    }


def tokenizer_source(model, tokenizer):
    """A tokenizer object, a folder holding tokenizer.json, or None (the model's own folder
    when it has one)."""
    if tokenizer is not None:
        return tokenizer
    from .arch import core_model

    name = getattr(getattr(core_model(model), "config", None), "_name_or_path", "") or ""
    d = Path(name) if name else None
    if d is not None and d.is_dir() and (d / "tokenizer.json").is_file():
        return d
    return None


def write_tokenizer(source, out: Path) -> list[str]:
    """Copy (folder) or save (tokenizer object) the tokenizer files; the chat template is
    also put inline in tokenizer_config.json, where ONNX Runtime GenAI's tokenizer reads it
    (transformers 5 writes it to chat_template.jinja)."""
    if source is None:
        return []
    if isinstance(source, (str, Path)):
        d = Path(source)
        if not (d / "tokenizer.json").is_file():
            raise ExportError(f"tokenizer {d}: no tokenizer.json in the folder")
        for f in TOKENIZER_FILES:
            if (d / f).is_file():
                shutil.copyfile(d / f, out / f)
    elif hasattr(source, "save_pretrained"):
        source.save_pretrained(str(out))
    else:
        raise ExportError(f"tokenizer must be a transformers tokenizer or a folder, got {type(source).__name__}")
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    template = out / "chat_template.jinja"
    if "chat_template" not in cfg and template.is_file():
        cfg["chat_template"] = template.read_text(encoding="utf-8")
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES)
