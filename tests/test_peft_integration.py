"""PEFT on qlora_kernels' layers against PEFT on bitsandbytes' layers, from the same
weights and the same adapter initialisation: logits, loss, adapter gradients and five
AdamW steps agree within fp32 tolerance (both sides decode bit-identical NF4 weights;
they differ only in summation order)."""
import copy
import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.integrations.peft import QKLoraLinear
from qlora_kernels.bench.peers import bnb_quantize_model

from .hf_models import TARGETS, batch, tiny_model

RTOL = 1e-4  # relative to the largest magnitude of each compared tensor


def close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    err = (a.detach().float() - b.detach().float()).abs().max().item()
    scale = b.detach().float().abs().max().item() + 1e-12
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs magnitude {scale:.3g}"


bnb_quantize = bnb_quantize_model  # the name the other PEFT tests import


def pair(arch: str, use_dora: bool):
    from peft import LoraConfig

    from qlora_kernels.integrations.peft import get_peft_model  # PEFT's custom-module registration

    base = tiny_model(arch)
    cfg = dict(r=8, lora_alpha=16, target_modules=TARGETS[arch], lora_dropout=0.0, use_dora=use_dora,
               init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_peft_model(qk.quantize_model(copy.deepcopy(base), double_quant=True), LoraConfig(**cfg))
        theirs = get_peft_model(bnb_quantize(copy.deepcopy(base)), LoraConfig(**cfg))
    # the same adapter initialisation on both sides
    lora = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    missing = ours.load_state_dict(lora, strict=False)
    assert not missing.unexpected_keys
    assert sum(isinstance(m, QKLoraLinear) for m in ours.modules()) == 2 * len(TARGETS[arch])
    return ours, theirs


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_same_logits_loss_grads_and_training(arch, use_dora):
    ours, theirs = pair(arch, use_dora)
    ours.train(), theirs.train()
    b = batch()
    out_o, out_t = ours(**b), theirs(**b)
    close(out_o.logits, out_t.logits, "logits")
    close(out_o.loss, out_t.loss, "loss")
    out_o.loss.backward(), out_t.loss.backward()
    grads_t = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(grads_o) == set(grads_t) and grads_o
    for n in grads_t:
        close(grads_o[n], grads_t[n], f"grad {n}", rtol=1e-3)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (ours, theirs)]
    for step in range(5):
        for m, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            m(**batch(seed=10 + step)).loss.backward()
            opt.step()
    params_t = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            close(p, params_t[n], f"after 5 steps {n}", rtol=1e-3)


@pytest.mark.parametrize("case", ["dora", "dora dropout", "lora_bias", "two adapters"])
def test_bf16_layers_return_what_peft_returns(case):
    """On a bf16 model (fp32 adapters, PEFT's default) the layer's output is bf16 as PEFT's:
    DoRA's fp32 factor once promoted it to fp32 (the next layer's attention then failed), and
    the route for several adapters or lora_bias fed bf16 x to fp32 adapters."""
    from peft import LoraConfig
    from peft import get_peft_model as stock_get_peft_model

    from qlora_kernels.integrations.peft import get_peft_model

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    kw = dict(r=4, target_modules=["0"], use_dora=case.startswith("dora"), lora_bias=case == "lora_bias",
              lora_dropout=0.1 if case == "dora dropout" else 0.0)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    outs = []
    for make, base in ((get_peft_model, qk.nn.Linear4bit.from_linear(lin)), (stock_get_peft_model, copy.deepcopy(lin))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = make(torch.nn.Sequential(base).to(torch.bfloat16), LoraConfig(**kw))
            if case == "two adapters":
                m.add_adapter("b", LoraConfig(**kw))
                m.base_model.set_adapter(["default", "b"])
        m.train(case == "dora dropout")
        outs.append(m(x))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16, (outs[0].dtype, outs[1].dtype)
