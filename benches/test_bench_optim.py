"""Fused AdamW step: qlora_kernels.optim.AdamW beside torch.optim.AdamW (fused=True and
foreach=True) on the same parameters, 1M / 10M / 40M fp32 elements split over 7 tensors of
mixed sizes (the A and B matrices of a LoRA model plus a small one)."""
import pytest
import torch

from qlora_kernels.bench import Case
from qlora_kernels.optim import AdamW

# Fractions of the total held by each tensor: two large, a few medium, one tiny.
SPLIT = (0.3, 0.3, 0.12, 0.12, 0.08, 0.0799, 0.0001)
SIZES = {"1M": 1_000_000, "10M": 10_000_000, "40M": 40_000_000}
PEERS = {
    "qlora-kernels": lambda ps: AdamW(ps, lr=1e-3, weight_decay=1e-2),
    "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True),
    "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
}


def _params(total: int):
    sizes = [max(1, int(total * f)) for f in SPLIT]
    sizes[0] += total - sum(sizes)
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(n, generator=gen).requires_grad_() for n in sizes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return ps


def optim_case(total: int, label: str, name: str) -> Case:
    opt = PEERS[name](_params(total))
    opt.step()  # allocate the state outside the timed rounds
    return Case(f"AdamW step {label} params (7 tensors)", name, opt.step, name == "qlora-kernels", total, "Gelem/s")


IDS = [(label, name) for label in SIZES for name in PEERS]


@pytest.mark.parametrize("label,name", IDS, ids=[f"{label}-{name}" for label, name in IDS])
def test_adamw_step(bench_case, label, name):
    bench_case(optim_case(SIZES[label], label, name), rounds=15)
