"""Whole QLoRA fine-tunes on the opencl backend: the model code, qlora_kernels.nn and
AdamW run unchanged, and the loss curve equals the cpu backend's within a stated
tolerance (the backends differ only in fp32 summation order inside the linear kernels)."""
import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import opencl as ocl

STEPS = 20
# Per-step relative difference allowed between the two loss curves.  Measured: 1e-7 to 2e-7
# (fp32 summation order inside the linear kernels; AdamW barely amplifies it in 20 steps).
LOSS_RTOL = 1e-5


def _attach_lora(model: nn.Module, r: int, alpha: float, dropout: float) -> list[nn.Parameter]:
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, qk.nn.Linear4bit)]
    assert targets, "quantize_model found no linear layer"
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, qk.nn.LoraLinear(m, r=r, lora_alpha=alpha, lora_dropout=dropout))
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def _fine_tune(build, batch, loss_fn, backend: str, style: str = "ndrange") -> list[float]:
    torch.manual_seed(0)
    model = build()
    params = _attach_lora(qk.quantize_model(model, "nf4", 64, double_quant=True), r=4, alpha=8, dropout=0.05)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    losses = []
    with qk.use_backend(backend), ocl.use_style(style):
        model.train()
        for step in range(STEPS):
            torch.manual_seed(1000 + step)  # same dropout masks on both backends
            loss = loss_fn(model, *batch(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def _assert_same_curve(got: list[float], want: list[float]) -> None:
    rel = [abs(g - w) / abs(w) for g, w in zip(got, want)]
    assert max(rel) <= LOSS_RTOL, f"loss curves differ by up to {max(rel):.3g} (relative); opencl {got} cpu {want}"
    assert want[-1] < want[0], "the fine-tune should learn something"


def _mlp():
    return nn.Sequential(nn.Linear(96, 200), nn.GELU(), nn.Linear(200, 33))


def _mlp_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(24, 96, generator=g)
    return x, torch.sin(x[:, :33] * 2)


def _mse(model, x, target):
    return nn.functional.mse_loss(model(x), target)


@pytest.fixture(autouse=True)
def _opencl_required():
    reason = qk.unavailable_reason("opencl")
    assert reason is None, f"the opencl backend must run here (CI installs PoCL): {reason}"


@pytest.mark.parametrize("style", ["ndrange", "fpga"])
def test_mlp_qlora_fine_tune_gives_the_cpu_loss_curve(style):
    want = _fine_tune(_mlp, _mlp_batch, _mse, "cpu")
    got = _fine_tune(_mlp, _mlp_batch, _mse, "opencl", style)
    _assert_same_curve(got, want)


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return Phi3ForCausalLM(cfg)


def _tokens(step):
    g = torch.Generator().manual_seed(step % 4)  # a small corpus seen several times
    return (torch.randint(3, 128, (2, 16), generator=g),)


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_tiny_phi3_qlora_fine_tune_gives_the_cpu_loss_curve():
    want = _fine_tune(_phi3, _tokens, _lm_loss, "cpu")
    got = _fine_tune(_phi3, _tokens, _lm_loss, "opencl")
    _assert_same_curve(got, want)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_model_trains_unchanged_on_opencl(use_dora):
    """get_peft_model on a quantize_model'd tiny Phi-3 (qlora_kernels' PEFT layers, DoRA's
    norm from the 4-bit weight through linear_4bit): the same curve on both backends."""
    import copy
    import warnings

    from peft import LoraConfig

    from qlora_kernels.integrations.peft import get_peft_model

    from .hf_models import TARGETS, batch, tiny_model

    base = tiny_model("phi3")
    curves = []
    for backend in ("cpu", "opencl"):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(qk.quantize_model(copy.deepcopy(base), double_quant=True),
                                   LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS["phi3"], lora_dropout=0.1,
                                              use_dora=use_dora, init_lora_weights=False))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        losses = []
        with qk.use_backend(backend):
            for step in range(10):
                torch.manual_seed(100 + step)
                loss = model(**batch(seed=step % 3)).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        curves.append(losses)
    _assert_same_curve(curves[1], curves[0])
