"""One rank of a data-parallel QLoRA run on a random Phi-3 (tests/hf_models.py config), for
tests/test_distributed.py and benches/dist_memory.py. Started once per rank with the
launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or alone with
--mode single. Every mode trains the same model on the same global batches with
qlora_kernels.optim.AdamW; rank 0 writes what the test compares to <out>/result.pt and the
adapter to <out>/adapter.

    python -m tests.dist_worker --mode single|ddp|fsdp2|zero2|zero3 --out DIR
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from tests.hf_models import TARGETS, batch, tiny_config

LR, WD = 1e-2, 1e-2


def build_model(hidden: int, layers: int):
    from peft import LoraConfig

    from qlora_kernels.integrations.peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import qlora_kernels as qk

    cfg = tiny_config("phi3")
    if hidden:
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = hidden, 4 * hidden, layers
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size = hidden // 64, hidden // 64, 4096
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    qk.quantize_model(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS["phi3"], lora_dropout=0.0))
    # PEFT starts B at zero, which would make every A gradient of step 1 zero: a weak check.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model, cfg.vocab_size


def full_grads(model, mode: str, engine=None) -> dict:
    from torch.distributed.tensor import DTensor

    from qlora_kernels.integrations.distributed import unwrap

    inner = unwrap(model)
    out = {}
    for n, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        if mode.startswith("zero"):
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)  # collective: every rank asks, in the same order
        else:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[n] = g.detach().clone()
    return out


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) so the training phase is measured apart
    from model construction (the fp32 model exists briefly before quantization)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def packed_local_fraction(model) -> float:
    """Bytes of packed 4-bit weights this rank holds between forwards / their full size:
    1/world when the engine really shards them, 1 when it replicates them."""
    from torch.distributed.tensor import DTensor

    from qlora_kernels.integrations.distributed import unwrap
    from qlora_kernels.nn import Linear4bit

    local = full = 0
    for m in unwrap(model).modules():
        if isinstance(m, Linear4bit):
            w = m.weight
            if isinstance(w, DTensor):
                local, full = local + w.to_local().numel(), full + w.numel()
            elif hasattr(w, "ds_tensor"):
                local, full = local + w.ds_tensor.numel(), full + w.ds_numel
            else:
                local, full = local + w.numel(), full + w.numel()
    return local / full


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["single", "ddp", "fsdp2", "zero2", "zero3"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=0, help="0: the tiny test config")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--torch-adamw", action="store_true", help="torch.optim.AdamW instead of ours")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from qlora_kernels.integrations import distributed as qd
    from qlora_kernels.optim import AdamW

    mode = args.mode
    rank, world = (0, 1) if mode == "single" else qd.init_process_group(deepspeed=mode.startswith("zero"))
    per_rank = qd.per_rank_batch_size(args.global_batch, world)
    model, vocab = build_model(args.hidden, args.layers)
    digest_before = qd.packed_digest(model)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    optim = torch.optim.AdamW if args.torch_adamw else AdamW
    engine = None
    if mode == "ddp":
        model = qd.wrap_ddp(model)
    elif mode == "fsdp2":
        model = qd.fully_shard_model(model)  # replaces the parameters: the optimizer comes after
    opt = optim([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD)
    if mode.startswith("zero"):
        config = qd.deepspeed_config(int(mode[-1]), per_rank, world_size=world)
        model = engine = qd.deepspeed_initialize(model, opt, config)

    import gc

    gc.collect()
    peak_reset = reset_peak_rss()
    losses, grads1 = [], None
    t0 = time.perf_counter()
    for step in range(args.steps):
        full = batch(seed=100 + step, b=args.global_batch, t=args.seq)
        full = {k: v % vocab for k, v in full.items()}
        local = qd.shard_batch(full, rank, world)
        loss = model(**local).loss
        if engine is not None:
            engine.backward(loss)
        else:
            loss.backward()
        if step == 0:
            grads1 = full_grads(model, mode, engine)
        if engine is not None:
            engine.step()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    fraction = packed_local_fraction(model)
    train_peak = peak_rss_kib()

    adapters = qd.adapter_state_dict(model)
    digest_after = qd.packed_digest(model)
    qd.save_adapter(model, os.path.join(args.out, "adapter"))
    peaks = [(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, train_peak)]  # KiB on Linux
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, peaks[0])
        peaks = gathered
    if rank == 0:
        torch.save(dict(grads1=grads1, adapters=adapters, losses=losses, digest_before=digest_before,
                        digest_after=digest_after, world=world, peak_rss_kib=peaks, peak_reset=peak_reset, model_rss_kib=rss_model, packed_local_fraction=fraction,
                        seconds=seconds), os.path.join(args.out, "result.pt"))
    if world > 1:
        import gc

        import torch.distributed as dist

        # The DDP reducer / engine hold the process group and gloo threads: drop them before
        # the group, or their destructors at interpreter exit can abort the rank
        # ("terminate called without an active exception").
        del model, opt, engine
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
