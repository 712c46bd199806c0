"""Data-parallel QLoRA on CPU servers with the engines users already run: PyTorch DDP,
PyTorch FSDP2 (``fully_shard``) and DeepSpeed ZeRO stages 2 and 3, all over gloo.

How the 4-bit layers ride through them (docs/distributed.md has the long form):

* ``Linear4bit.weight`` is a frozen ``uint8`` Parameter of shape ``[(out*in + 1) // 2, 1]``.
  DDP broadcasts it from rank 0 at wrap time and never reduces it (no gradient).
* FSDP2 shards it on dim 0 like any parameter and all-gathers the bytes before the
  layer's forward; its mixed-precision policy casts floating-point parameters only, so
  the bytes travel and arrive as ``uint8`` (checked in ``fully_shard_model``).
* ZeRO-3 partitions it and gathers it around the layer's forward and backward through its
  module hooks; ZeRO-2 partitions only gradients and optimizer state, which the frozen
  bytes do not have.
* The quantization metadata (``quant_state``: absmax, codebook, shape) is a plain
  attribute of the layer, not a parameter, so no engine shards, casts or broadcasts it:
  every rank builds it identically when it quantizes the same checkpoint.

Helpers here: process-group setup from the launcher's environment, the batch split, the
FSDP2 wrap (decoder layers bottom-up, then the root), DeepSpeed configs, and collective
adapter saving and digests of the packed bytes that work from every rank setup.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

MODES = ("ddp", "fsdp2", "zero2", "zero3")


# ------------------------------------------------------------------- process group ----

def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched() -> bool:
    """Whether a launcher (torchrun, the deepspeed launcher) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group(backend: str = "gloo", deepspeed: bool = False) -> tuple[int, int]:
    """Joins the process group the launcher describes in RANK/WORLD_SIZE/MASTER_ADDR/
    MASTER_PORT. Only gloo runs the CPU collectives these engines need here."""
    if backend != "gloo":
        raise ValueError(f"backend: only 'gloo' is supported for CPU training, got {backend!r}")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"init_process_group: {var} is not set; start the job with torchrun "
                               "--nproc_per_node N or the deepspeed launcher")
    if not dist.is_initialized():
        if deepspeed:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed as ds

            ds.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group("gloo")
    if dist.get_backend() != "gloo":
        raise RuntimeError(f"the process group uses {dist.get_backend()!r}; CPU training here needs gloo")
    return world()


# ------------------------------------------------------------------------- batches ----

def per_rank_batch_size(global_batch: int, world_size: int) -> int:
    """The micro-batch of each rank; the global batch must split evenly (every rank then
    averages over the same number of examples and the mean of rank means is the global mean)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_batch < 1 or global_batch % world_size:
        raise ValueError(f"the global batch size {global_batch} is not divisible by the world size {world_size}: "
                         f"pick a global batch that is a multiple of {world_size}")
    return global_batch // world_size


def shard_batch(batch: dict, rank: int, world_size: int) -> dict:
    """This rank's contiguous slice (dim 0) of every tensor in a global batch."""
    sizes = {t.shape[0] for t in batch.values() if isinstance(t, torch.Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"batch: tensors disagree on the batch dimension: {sorted(sizes)}")
    per = per_rank_batch_size(sizes.pop(), world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) for world_size {world_size}, got {rank}")
    return {k: v[rank * per:(rank + 1) * per] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------- DDP ----

def wrap_ddp(model: nn.Module, **kwargs) -> nn.Module:
    """DistributedDataParallel on CPU (gloo). Gradients are summed and divided by the world
    size by DDP itself (it never asks gloo for ReduceOp.AVG)."""
    from torch.nn.parallel import DistributedDataParallel

    _require_group()
    _require_cpu(model)
    return DistributedDataParallel(model, **kwargs)


# -------------------------------------------------------------------------- FSDP2 ----

def check_mesh(mesh) -> None:
    if mesh.device_type != "cpu":
        raise ValueError(f"mesh: the device mesh is on {mesh.device_type!r}; qlora-kernels trains on CPU, build it "
                         "with init_device_mesh('cpu', (world_size,))")
    if mesh.ndim != 1:
        raise ValueError(f"mesh: expected a 1-D data-parallel mesh, got {mesh.ndim} dimensions")


def _fsdp_root(model: nn.Module) -> nn.Module:
    # The root unit is the transformers model inside PEFT's wrappers: generate() and PEFT
    # call it directly, and its forward must be the one that gathers the root's parameters.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _bottom_up(root: nn.Module) -> list[nn.Module]:
    """Every module under ``root`` (itself last), each after all of its children, once:
    ``fully_shard`` must reach a module's descendants before the module (a parent sharded
    first already owns the child's parameters). Iterative, as deep models nest deeply."""
    order: list[nn.Module] = []
    seen = {root}  # modules hash by identity
    stack = [(root, iter(root.children()))]
    while stack:
        module, children = stack[-1]
        child = next((c for c in children if c not in seen), None)
        if child is None:
            stack.pop()
            order.append(module)
        else:
            seen.add(child)
            stack.append((child, iter(child.children())))
    return order


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 wrap units, in the bottom-up order ``fully_shard`` needs: every module whose
    class a (transformers) model names in ``_no_split_modules``, nested ones too, as
    accelerate's FSDP2 transformer wrap policy does (MBart names its attention and its layers);
    else every module holding a 4-bit layer directly. Never the root (the transformers model
    inside PEFT's wrappers), which ``fully_shard_model`` shards last."""
    from ..nn import Linear4bit

    root = _fsdp_root(model)
    below = _bottom_up(root)[:-1]
    names: set[str] = set()
    for m in (root, *below):
        names.update(getattr(m, "_no_split_modules", None) or [])
    units = [m for m in below if type(m).__name__ in names]
    if units:
        return units
    return [m for m in below if any(isinstance(c, Linear4bit) for c in m.children())]


def fully_shard_model(model: nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over a (PEFT) QLoRA model: ``fully_shard`` on each unit of ``decoder_layers``,
    bottom-up, then on the root. Units the caller already sharded are left as they are.
    Packed 4-bit weights shard on dim 0 with everything else and are all-gathered as bytes;
    ``mp_policy`` applies to floating-point parameters only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from ..nn import Linear4bit

    _require_group()
    _require_cpu(model)
    mesh = mesh if mesh is not None else init_device_mesh("cpu", (dist.get_world_size(),))
    check_mesh(mesh)
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for layer in model.modules():
        if isinstance(layer, Linear4bit) and layer.weight.dtype != torch.uint8:
            raise TypeError("fully_shard_model: a Linear4bit weight is not uint8; quantize with qlora_kernels")
    root = _fsdp_root(model)
    if isinstance(root, FSDPModule):
        # Its descendants would now be sharded after it, which FSDP2 cannot do.
        raise ValueError(f"fully_shard_model: the root {type(root).__name__} already has FSDP2 state; pass the "
                         "unsharded model (sub-modules you sharded yourself are kept as they are)")
    kw = dict(mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # A module the caller sharded keeps its own unit; what lies inside it is skipped too, as
    # sharding it now would come after its parent.
    done = {m for d in root.modules() if isinstance(d, FSDPModule) for m in d.modules()}
    for unit in decoder_layers(model):
        if unit not in done:
            fully_shard(unit, **kw)
    fully_shard(root, **kw)
    return model


# ---------------------------------------------------------------------- DeepSpeed ----

def deepspeed_config(stage: int, micro_batch_size: int, gradient_accumulation_steps: int = 1,
                     world_size: Optional[int] = None, gradient_clipping: float = 0.0,
                     persist_small_params: bool = False) -> dict:
    """A ZeRO config for CPU training with a client optimizer (qlora_kernels.optim.AdamW).
    fp32 throughout (DeepSpeed's bf16 mode casts the module; the kernels compute in fp32).
    ZeRO-3 partitions every parameter, the packed 4-bit bytes included, unless
    ``persist_small_params`` keeps DeepSpeed's default of replicating params < 1e5 elements."""
    if stage not in (2, 3):
        raise ValueError(f"stage must be 2 or 3, got {stage!r}")
    if micro_batch_size < 1 or gradient_accumulation_steps < 1:
        raise ValueError("micro_batch_size and gradient_accumulation_steps must be >= 1")
    world_size = world_size or world()[1]
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3 and not persist_small_params:
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9))
    return {
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        # DeepSpeed vets only its own optimizers under ZeRO; ours is a plain torch.optim one.
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def deepspeed_initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """deepspeed.initialize with a client optimizer; returns the engine."""
    import deepspeed

    _require_group()
    _require_cpu(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def zero3_enabled(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


# ------------------------------------------------------------------ saving, digests ----

def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper or a DeepSpeed engine (FSDP2 wraps in place)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _full_tensors(named: Iterable[tuple[str, torch.Tensor]], model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole, detached copies of the given parameters on every rank (a collective under FSDP2
    and ZeRO-3: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    named = list(named)
    params = [p for _, p in named]
    if zero3_enabled(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().clone() for n, p in named}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters, whole, keyed as in the unwrapped model. Collective."""
    inner = unwrap(model)
    return _full_tensors(((n, p) for n, p in inner.named_parameters() if p.requires_grad), inner)


def save_adapter(model: nn.Module, path: str) -> None:
    """Saves the PEFT adapter from rank 0 in PEFT's format, whatever the engine. Every rank
    must call it (FSDP2 and ZeRO-3 gather the shards)."""
    inner = unwrap(model)
    if not hasattr(inner, "save_pretrained") or not hasattr(inner, "peft_config"):
        raise TypeError("save_adapter: model must be a PEFT model (peft.get_peft_model), possibly wrapped")
    state = adapter_state_dict(inner)
    if world()[0] == 0:
        inner.save_pretrained(path, state_dict=state)
    if dist.is_initialized():
        dist.barrier()


def packed_digest(model: nn.Module) -> str:
    """sha256 over every 4-bit layer's packed bytes and absmax, in module order, gathered
    whole. Collective under FSDP2 and ZeRO-3."""
    from ..nn import Linear4bit

    inner = unwrap(model)
    layers = [(n, m) for n, m in inner.named_modules() if isinstance(m, Linear4bit)]
    full = _full_tensors(((n, m.weight) for n, m in layers), inner)
    h = hashlib.sha256()
    for n, m in layers:
        h.update(n.encode())
        h.update(full[n].contiguous().view(torch.uint8).numpy().tobytes())
        h.update(m.quant_state.absmax.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _require_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("no process group: call qlora_kernels.integrations.distributed.init_process_group() "
                           "(under torchrun or the deepspeed launcher) first")


def _require_cpu(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        if p.device.type not in ("cpu", "meta"):
            raise ValueError(f"model: parameter {n!r} is on {p.device}; these recipes train on CPU")
