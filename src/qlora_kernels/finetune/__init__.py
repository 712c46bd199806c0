"""``qlora-kernels finetune``: QLoRA/LoRA/DoRA fine-tuning of a Hugging Face causal LM on
our kernels, with a built-in default (SmolLM2-135M-Instruct on chatterbot-corpus's English
question/answer pairs) so that the command runs with no arguments.

One room per concern:
  data.py        records from chatterbot-corpus or JSONL, chat-template tokenization with
                 response-only labels, the held-out split, seeded batch order
  model.py       model folder checks, loading, NF4 quantization, PEFT adapters
  train.py       the training loop (progress bar, signals), held-out loss, greedy samples
  checkpoint.py  atomic files and folders, resumable checkpoints (adapter, optimizer, RNG)
  report.py      metrics.json, the loss-curve PNG, the console summary
  command.py     argparse options and the run from start to end
"""
from __future__ import annotations


class FinetuneError(Exception):
    """Bad input or an unusable environment: the command prints the message as one line
    (no traceback unless --debug) and exits non-zero."""


__all__ = ["FinetuneError"]
