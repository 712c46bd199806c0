"""The sharded part of a checkpoint under FSDP2 and DeepSpeed ZeRO, in each engine's own
format: ``torch.distributed.checkpoint`` (one file per rank plus its metadata) for FSDP2,
``engine.save_checkpoint`` / ``load_checkpoint`` for ZeRO-2/3. Only the trainable (adapter)
parameters and their optimizer state are written: the frozen 4-bit bytes are rebuilt
identically by every rank when it quantizes the same base model.

Every function here is a collective: every rank calls it, with the same folder."""
from __future__ import annotations

from pathlib import Path

from . import FinetuneError

DCP_DIR = "dcp"
DS_DIR = "deepspeed"
DS_TAG = "state"  # a fixed tag: the checkpoint folder, not DeepSpeed's 'latest' file, says which one


def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def _adapter_shards(model) -> dict:
    """The trainable parameters as DTensors sharing the parameters' storage, so that
    dcp.load writes straight into them. Not get_model_state_dict: its key-to-attribute walk
    fails on Linear4bit's quantization-state keys (``weight.absmax``: the weight is a DTensor)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save(session, folder: Path, model, optimizer) -> None:
    if session.mode == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, optimizer, options=_dcp_options())
        dcp.save({"model": _adapter_shards(model), "optim": osd}, checkpoint_id=str(folder / DCP_DIR))
    elif session.zero:
        session.engine.save_checkpoint(str(folder / DS_DIR), tag=DS_TAG, save_latest=False,
                                       exclude_frozen_parameters=True)
    else:
        raise ValueError(f"no sharded checkpoint under --distributed {session.mode}")


def load(session, folder: Path, model, optimizer) -> None:
    if session.mode == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if not (folder / DCP_DIR / ".metadata").is_file():
            raise FinetuneError(f"checkpoint {folder}: no FSDP2 state ({DCP_DIR}/.metadata)")
        state = {"model": _adapter_shards(model),
                 "optim": get_optimizer_state_dict(model, optimizer, options=_dcp_options())}
        try:
            dcp.load(state, checkpoint_id=str(folder / DCP_DIR))  # in place, every key required
        except (CheckpointException, RuntimeError, ValueError) as e:  # a BaseException: caught by name
            raise FinetuneError(f"checkpoint {folder}: the FSDP2 state does not fit the model "
                                f"({str(e).strip().splitlines()[0]})") from None
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_dcp_options())
    elif session.zero:
        if not (folder / DS_DIR / DS_TAG).is_dir():
            raise FinetuneError(f"checkpoint {folder}: no DeepSpeed state ({DS_DIR}/{DS_TAG}/)")
        # The scheduler is ours (LambdaLR on the client optimizer), restored beside this.
        path, _ = session.engine.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False,
                                                 custom_load_fn=lambda src, dst: _load_zero_module(folder, src, dst))
        if path is None:
            raise FinetuneError(f"checkpoint {folder}: DeepSpeed could not load {DS_DIR}/{DS_TAG}/")
    else:
        raise ValueError(f"no sharded checkpoint under --distributed {session.mode}")


def _load_zero_module(folder: Path, src: dict, dst) -> None:
    """DeepSpeed's module part of the checkpoint, adapter parameters only. Under ZeRO-2 the
    parameters are whole on every rank and are copied back here: the optimizer's fp32
    partitions also come back, but reach the parameters only at the next step, after the
    forward that needs them. Under ZeRO-3 the parameters are partitioned, the module file
    holds placeholders, and the partitions come back from the optimizer's fp32 state
    (load_from_fp32_weights). torch's load_state_dict is not used: it would meet
    Linear4bit's quantization-state keys without the (frozen, unsaved) bytes they describe."""
    import torch

    params = [(n, p) for n, p in dst.named_parameters() if p.requires_grad]
    missing = [n for n, _ in params if n not in src]
    if missing:
        raise FinetuneError(f"checkpoint {folder}: adapter does not fit the model ({missing[0]} ...)")
    if any(hasattr(p, "ds_id") for _, p in params):
        return
    with torch.no_grad():
        for n, p in params:
            if src[n].shape != p.shape:
                raise FinetuneError(f"checkpoint {folder}: {n} has shape {tuple(src[n].shape)}, the model "
                                    f"{tuple(p.shape)}")
            p.copy_(src[n])
