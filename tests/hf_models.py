"""Tiny random Hugging Face models built from configs (no download), shared by the
integration tests."""
import torch


def tiny_config(arch: str):
    # Every projection's input size is a multiple of 64: bitsandbytes' AVX-512 CPU
    # dequantization mis-reads absmax when a row is not whole blocks (docs/formats.md), and
    # these tests compare against bitsandbytes' layers.
    from transformers import LlamaConfig, Phi3Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    return Phi3Config(**common, tie_word_embeddings=False)


TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    model.eval()
    return model


def batch(seed: int = 1, b: int = 2, t: int = 16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def lora_peft(model, arch: str):
    """PEFT LoRA r=4 (non-zero B) on every projection of a tiny ``arch`` model, via our PEFT
    integration, in training mode."""
    import warnings

    from peft import LoraConfig

    from qlora_kernels.integrations.peft import get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_dropout=0.0, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, cfg)
    pm.train()
    return pm
