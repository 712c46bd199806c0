"""Files that survive an interruption: every file is written under a temporary name and
renamed into place (a rename is atomic on one filesystem), and a checkpoint is a folder
built aside and swapped in, so a kill at any instant leaves either the previous checkpoint
or the new one, never a half-written mix.

A checkpoint holds the adapter (PEFT's format), the optimizer and scheduler states, the
RNG states (torch, python, numpy) and state.json (step, losses so far, the held-out
results measured before training, the run's configuration)."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import FinetuneError

NAME = "checkpoint"
_PREV = ".checkpoint.prev"
_TMP_PREFIX = ".checkpoint.tmp-"


# -- atomic files -----------------------------------------------------------------------------
def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_adapter(model, out: Path, state_dict=None) -> list:
    """PEFT's save_pretrained into a scratch folder, then its two adapter files renamed into
    ``out`` (PEFT also writes a README.md model card there, which could overwrite a user's
    README: it stays behind). Returns the names written."""
    tmp = out / f".adapter.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, save_embedding_layers=False, state_dict=state_dict)
        names = []
        umask = os.umask(0)
        os.umask(umask)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            os.chmod(tmp / name, 0o666 & ~umask)  # safetensors creates 0600; users expect their umask
            os.replace(tmp / name, out / name)
            names.append(name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- RNG --------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


# -- checkpoints ------------------------------------------------------------------------------
def clean_stale(out: Path) -> None:
    """Scratch folders of checkpoints that a SIGKILL cut short (ours by name, never a user's)."""
    for p in out.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)


def save(out: Path, model, optimizer, scheduler, state: dict, session=None) -> Path:
    """Writes the checkpoint of ``state["step"]``. Under a data-parallel ``session`` every rank
    calls it: ddp's replicas are whole, so rank 0 writes alone; FSDP2 and ZeRO ranks each
    write their shards (sharded_checkpoint) into the same scratch folder first."""
    final = out / NAME
    sharded = session is not None and session.sharded
    writer = session is None or session.main  # of the files that are not shards
    if not (writer or sharded):
        return final
    # Ranks agree on the scratch folder's name by the step (a pid differs between ranks).
    tmp = out / (f"{_TMP_PREFIX}step{state['step']}" if sharded else f"{_TMP_PREFIX}{os.getpid()}")
    if writer:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if sharded:
        from ..integrations.distributed import adapter_state_dict
        from . import sharded_checkpoint

        session.barrier()
        sharded_checkpoint.save(session, tmp, model, optimizer)
        adapters = adapter_state_dict(model)  # collective: the whole adapter, for PEFT users
        if session.main:
            model.save_pretrained(tmp / "adapter", save_embedding_layers=False, state_dict=adapters)
    else:
        model.save_pretrained(tmp / "adapter", save_embedding_layers=False)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if writer:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        atomic_json(tmp / "state.json", state)
    if sharded:
        session.barrier()  # every rank's shards are on disk before the swap
    if writer:
        _swap_in(tmp, final, out / _PREV)
    if sharded:
        session.barrier()
    return final


def _swap_in(tmp: Path, final: Path, prev: Path) -> None:
    # The old checkpoint steps aside before the new one takes its name, so one of the two
    # is always complete (find() falls back to the previous).
    if final.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(final, prev)
    os.replace(tmp, final)
    shutil.rmtree(prev, ignore_errors=True)


def find(out: Path) -> Optional[Path]:
    for p in (out / NAME, out / _PREV):
        if (p / "state.json").is_file():
            return p
    return None


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FinetuneError(f"checkpoint {path}: state.json is unreadable ({e})") from None


def engine_of(session) -> dict:
    return {"mode": session.mode, "world": session.world}


def check_engine(path: Path, saved: dict, session) -> None:
    """A single-process or ddp checkpoint holds whole tensors and resumes under either; a
    sharded one resumes only under the engine and the number of processes that wrote it."""
    was = saved.get("engine") or {"mode": "none", "world": 1}
    if not session.sharded and was["mode"] in ("none", "ddp"):
        return
    if (was["mode"], was["world"]) != (session.mode, session.world):
        def say(e):
            return "one process" if e["mode"] == "none" else f"--distributed {e['mode']} with {e['world']} processes"
        raise FinetuneError(f"--resume: the checkpoint {path} was written under {say(was)}; resume it that way "
                            f"(this run: {say(engine_of(session))})")


def restore(path: Path, model, optimizer, scheduler, session=None) -> None:
    """Adapter weights, optimizer, scheduler and RNG states back in place, bit for bit.
    Under FSDP2 and ZeRO a collective (every rank loads its shards)."""
    if session is not None and session.sharded:
        from . import sharded_checkpoint

        sharded_checkpoint.load(session, path, model, optimizer)
    else:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(path / "adapter" / "adapter_model.safetensors")
        res = set_peft_model_state_dict(model, weights)
        unexpected = list(getattr(res, "unexpected_keys", []) or [])
        if unexpected:
            raise FinetuneError(f"checkpoint {path}: adapter does not fit the model ({unexpected[0]} ...)")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    # The learning rate the next step uses: the optimizer's own state carries it under ddp,
    # but an engine's optimizer state may not (the scheduler is ours, outside the engine).
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
