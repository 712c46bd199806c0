"""TRL's SFTTrainer runs unchanged on a model quantized with qlora_kernels (PEFT creates
our fused layers), including under the bf16 autocast TRL enables on capable CPUs, with and
without our fused output head + loss installed (TRL 1.x computes its loss through its own
fused LM head, ``fused_lm_head=True``; ours stays out of its way)."""
import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.integrations.peft import QKLoraLinear

from .hf_models import tiny_model


def char_tokenizer():
    """A character-level tokenizer built in place (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz .,?!")
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.mark.parametrize("fuse_loss", [False, True])
def test_sft_trainer_steps_reduce_the_loss(tmp_path, fuse_loss):
    from datasets import Dataset
    from peft import LoraConfig

    from qlora_kernels.integrations.peft import register
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = qk.quantize_model(tiny_model("llama"), double_quant=True, fuse_loss=fuse_loss)
    packed_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    data = Dataset.from_dict({"text": ["the quick brown fox jumps over the lazy dog."] * 16})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", max_length=64, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=char_tokenizer(),
                             peft_config=register(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QKLoraLinear)
    assert torch.equal(layer.get_base_layer().weight, packed_before)  # the frozen 4-bit bytes never move
