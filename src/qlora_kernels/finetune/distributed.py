"""``qlora-kernels finetune --distributed ddp|fsdp2|zero2|zero3``: the command under torchrun
or the deepspeed launcher. Every rank loads the same model and data and collates the same
global micro-batch (``--batch-size`` examples); each trains on its contiguous slice, and the
loss is scaled so that the engines' gradient averaging yields exactly the single-process
gradient of the per-token mean over the global step. Rank 0 prints and writes files."""
from __future__ import annotations

import gc
from typing import Optional

import torch

from . import FinetuneError

MODES = ("none", "ddp", "fsdp2", "zero2", "zero3")


class Session:
    """The data-parallel context of one run (mode 'none': a single process)."""

    def __init__(self, mode: str, rank: int = 0, world: int = 1):
        self.mode, self.rank, self.world = mode, rank, world
        self.engine = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.mode != "none"

    @property
    def zero(self) -> bool:
        return self.mode.startswith("zero")

    @property
    def sharded(self) -> bool:
        """Whether the engine shards the adapter or its optimizer state across ranks (then
        every rank writes its part of a checkpoint, in the engine's own format)."""
        return self.mode in ("fsdp2", "zero2", "zero3")

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()

    def sum(self, x: float) -> float:
        if not self.on:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t)

    def agree(self, signum: int) -> int:
        """The signal any rank received (0: none), on every rank: ranks stop together and
        write the checkpoint together (its collectives need all of them)."""
        if not self.on:
            return signum
        t = torch.tensor([signum], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t)

    def broadcast(self, obj):
        """Rank 0's value of obj on every rank (e.g. the time-stamped output folder)."""
        if not self.on:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def check_batch(self, batch_size: int) -> None:
        from ..integrations.distributed import per_rank_batch_size

        try:
            per_rank_batch_size(batch_size, self.world)
        except ValueError as e:
            raise FinetuneError(f"--batch-size: {e}") from None

    def close(self) -> None:
        if self.on:
            # Wrappers that hold the group (DDP's reducer, DeepSpeed's engine) may sit in
            # reference cycles: collect them before the group goes, or their destructors at
            # interpreter exit can abort the rank.
            gc.collect()
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def shard(self, batch: dict) -> dict:
        if not self.on:
            return batch
        from ..integrations.distributed import shard_batch

        return shard_batch(batch, self.rank, self.world)

    def wrap(self, model, opt, batch_size: int, grad_accum: int):
        """The module the training loop runs (DDP wrapper, FSDP2-sharded model or DeepSpeed
        engine) and the optimizer to step (FSDP2 replaces parameters: a new one is built)."""
        from ..integrations import distributed as qd

        if self.mode == "ddp":
            return qd.wrap_ddp(model), opt
        if self.mode == "fsdp2":
            qd.fully_shard_model(model)
            group = dict(opt.param_groups[0])
            group["lr"] = group.get("initial_lr", group["lr"])  # a scheduler already scaled "lr"
            fresh = type(opt)([p for p in model.parameters() if p.requires_grad],
                              **{k: v for k, v in group.items() if k in ("lr", "betas", "eps", "weight_decay")})
            return model, fresh
        if self.zero:
            per_rank = qd.per_rank_batch_size(batch_size, self.world)
            config = qd.deepspeed_config(int(self.mode[-1]), per_rank, gradient_accumulation_steps=grad_accum,
                                         world_size=self.world, gradient_clipping=1.0)
            self.engine = qd.deepspeed_initialize(model, opt, config)
            return self.engine, opt
        return model, opt

    def backward(self, loss_sum: torch.Tensor, n_total: int, grad_accum: int) -> None:
        """Backward of this rank's share of the step's per-token mean loss. The engines
        average gradients over ranks (DeepSpeed also divides by its accumulation steps), so
        the local sum is scaled back up by what they will divide by."""
        if self.engine is not None:
            self.engine.backward(loss_sum * (self.world * grad_accum) / n_total)
        else:
            (loss_sum * self.world / n_total).backward()

    def step(self, opt, params) -> None:
        if self.engine is not None:  # clips (config) and steps at the accumulation boundary
            self.engine.step()
            return
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def micro_done(self) -> None:
        """DeepSpeed counts micro-batches through engine.step(); called after each one but the last."""
        if self.engine is not None:
            self.engine.step()


def setup(mode: Optional[str]) -> Session:
    """Joins the launcher's process group for ``mode`` (default: ddp when launched with more
    than one process); bad combinations fail before the model loads."""
    from ..integrations import distributed as qd

    if mode is None:
        mode = "ddp" if qd.launched() else "none"
    if mode not in MODES:
        raise FinetuneError(f"--distributed {mode!r} is unknown; choose from {', '.join(MODES)}")
    if mode == "none":
        if qd.launched():
            raise FinetuneError("--distributed none: this process was started by a launcher with WORLD_SIZE > 1; "
                                "pick ddp, fsdp2, zero2 or zero3")
        return Session("none")
    if not qd.launched():
        raise FinetuneError(f"--distributed {mode}: start the command with torchrun --nproc_per_node N (or the "
                            "deepspeed launcher); WORLD_SIZE is not > 1 here")
    try:
        rank, world = qd.init_process_group(deepspeed=mode.startswith("zero"))
    except (ValueError, RuntimeError, ImportError) as e:
        raise FinetuneError(f"--distributed {mode}: {e}") from None
    return Session(mode, rank, world)
