"""Linear4bit, LoraLinear and quantize_model."""
import re

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import nn as qnn

from .conftest import assert_equals_bnb_dequant


def test_linear4bit_from_linear_matches_functional(path):
    lin = torch.nn.Linear(70, 33)
    m = qnn.Linear4bit.from_linear(lin, "fp4", 128, double_quant=True)
    assert (m.in_features, m.out_features, m.quant_type, m.blocksize) == (70, 33, "fp4", 128)
    assert m.weight.dtype == torch.uint8 and not m.weight.requires_grad
    x = torch.randn(2, 3, 70)
    packed, state = qk.quantize_4bit(lin.weight.detach(), "fp4", 128, True)
    assert torch.equal(m.weight, packed)
    torch.testing.assert_close(m(x), x @ m.dequantize().t() + lin.bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(m.dequantize(), qk.dequantize_4bit(packed, state))


def test_state_dict_uses_bitsandbytes_keys_and_round_trips(bnb):
    m = qnn.Linear4bit(64, 32, double_quant=True)
    sd = m.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    other = qnn.Linear4bit(64, 32)
    other.load_state_dict(sd)
    x = torch.randn(4, 64)
    assert torch.equal(other(x), m(x))
    # bitsandbytes reads the same keys
    st = bnb.functional.QuantState.from_dict({k[7:]: v for k, v in sd.items() if k.startswith("weight.")},
                                             device=torch.device("cpu"))
    assert_equals_bnb_dequant(bnb, m.dequantize(), sd["weight"], st)


def test_load_rejects_a_state_for_another_shape():
    sd = qnn.Linear4bit(64, 32).state_dict()
    with pytest.raises(RuntimeError, match=r"quantization state is for shape \(32, 64\)"):
        qnn.Linear4bit(64, 16).load_state_dict(sd)


@pytest.mark.parametrize("double_quant", [False, True])
def test_load_rejects_values_no_forward_could_use(double_quant):
    """NaN/Inf scales loaded with every key reported matched, then gave NaN outputs; an fp4
    codebook under an nf4 state loaded too, and only the first forward failed, naming no
    key. from_pretrained already refused both (integrations.transformers)."""
    sd = qnn.Linear4bit(64, 32, double_quant=double_quant).state_dict()
    scale = "weight.nested_absmax" if double_quant else "weight.absmax"
    for key, value, says in ((scale, float("inf"), "holds NaN or Inf"), (scale, float("nan"), "holds NaN or Inf"),
                             ("weight.quant_map", None, "not the nf4 codebook")):
        bad = {k: v.clone() for k, v in sd.items()}
        if value is None:
            bad[key] = qk.formats.codebook("fp4").clone()
        else:
            bad[key].view(-1)[0] = value
        layer = qnn.Linear4bit(64, 32, double_quant=double_quant)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with pytest.raises(RuntimeError, match=re.escape(f"{key}: {says}")):
            layer.load_state_dict(bad)
        assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_quantize_model_swaps_linears_except_skipped():
    model = torch.nn.ModuleDict({
        "body": torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)),
        "lm_head": torch.nn.Linear(8, 4),
    })
    out = qk.quantize_model(model, blocksize=32)
    assert out is model
    assert isinstance(model["body"][0], qnn.Linear4bit) and isinstance(model["body"][2], qnn.Linear4bit)
    assert type(model["lm_head"]) is torch.nn.Linear
    assert model["body"][0].blocksize == 32


def test_quantize_model_shared_tied_bare_and_string_skip():
    """Found by a review: a layer under two names was converted under one only; a head tied
    to the embedding was quantized (and broke at the next tie_weights()); a bare nn.Linear
    got a child named ""; skip="lm_head" was read as seven one-letter names."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shared = torch.nn.Linear(16, 16)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared), "lm_head": torch.nn.Linear(16, 4)})
    qk.quantize_model(model, skip="lm_head")
    assert isinstance(model["a"], qnn.Linear4bit) and model["b"][0] is model["a"]
    assert type(model["lm_head"]) is torch.nn.Linear
    bare = qk.quantize_model(torch.nn.Linear(64, 32))
    assert isinstance(bare, qnn.Linear4bit) and not list(bare.children())
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    qk.quantize_model(lm, skip=())
    assert type(lm.lm_head) is torch.nn.Linear and lm.lm_head.weight is lm.model.embed_tokens.weight
    assert isinstance(lm.model.layers[0].mlp.up_proj, qnn.Linear4bit)
    lm.tie_weights()
    assert lm(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)


def test_lora_linear_module_trains_only_adapters(path):
    base = qnn.Linear4bit(32, 16, bias=True)
    base.bias.requires_grad_(False)
    layer = qnn.LoraLinear(base, r=4, lora_alpha=8, lora_dropout=0.1)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0  # PEFT's init: the adapter starts as a no-op
    x = torch.randn(3, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x))
    layer.train()
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert qnn.LoraLinear(torch.nn.Linear(32, 16), r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    with pytest.raises(TypeError, match="base must be"):
        qnn.LoraLinear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="r must be a positive int"):
        qnn.LoraLinear(torch.nn.Linear(4, 4), r=0)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(r=True), ValueError, "r must"),                  # bool is an int to Python
    (dict(lora_alpha="8"), ValueError, "lora_alpha"),
    (dict(lora_alpha=float("inf")), ValueError, "lora_alpha"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    (dict(lora_dropout=float("nan")), ValueError, "lora_dropout"),
    (dict(lora_dropout="0.1"), ValueError, "lora_dropout"),
    (dict(use_rslora="yes"), TypeError, "use_rslora"),
])
def test_lora_linear_rejects_bad_hyperparameters_by_name(kw, exc, name):
    # Each of these built a layer (or failed later with a message naming no argument).
    with pytest.raises(exc, match=name):
        qnn.LoraLinear(torch.nn.Linear(4, 4), **kw)


def test_device_meta_builds_shapes_only_and_loads_with_assign():
    # nn.Linear(device="meta") allocates nothing; ours built a CPU weight (and quantized it) and
    # ignored the argument. The meta layer then takes a real state dict, as FSDP's meta-device
    # initialisation and transformers' loading do.
    from qlora_kernels.nn import Linear4bit

    meta = Linear4bit(64, 24, device="meta")
    assert {t.device.type for t in (meta.weight, meta.quant_state.absmax, meta.bias)} == {"meta"}
    real = Linear4bit(64, 24)
    meta.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(3, 64)
    assert torch.equal(meta(x), real(x))


def test_from_linear_refuses_a_zero3_partitioned_weight():
    # Under deepspeed.zero.Init a Linear's weight is an empty placeholder of shape (0,) with
    # ds_id/ds_status; it was quantized into a layer with no bytes that failed only at forward.
    from qlora_kernels.nn import Linear4bit

    lin = torch.nn.Linear(64, 32)
    lin.weight = torch.nn.Parameter(torch.empty(0))
    lin.weight.ds_id, lin.weight.ds_status = 3, "NOT_AVAILABLE"
    with pytest.raises(ValueError, match=r"shape \(0,\), expected .* \(32, 64\).*ZeRO-3"):
        Linear4bit.from_linear(lin)
    with pytest.raises(ValueError, match="ZeRO-3"):
        qk.quantize_model(torch.nn.Sequential(lin))
    bad = torch.nn.Linear(64, 32)
    bad.weight = torch.nn.Parameter(torch.zeros(32, 63))  # any other mismatch: the shapes, no ZeRO hint
    with pytest.raises(ValueError, match=r"shape \(32, 63\)") as err:
        Linear4bit.from_linear(bad)
    assert "ZeRO" not in str(err.value)


def test_packed_bytes_without_their_state_are_refused():
    # a state dict holding only weight and bias loaded "All keys matched" and decoded the new
    # bytes with the layer's own random-init absmax: ~100x off, no error
    from qlora_kernels.nn import Linear4bit

    src = torch.nn.Linear(64, 8)
    with torch.no_grad():
        src.weight.mul_(100)
    sd = Linear4bit.from_linear(src).state_dict()
    layer = Linear4bit(64, 8)
    before = layer.weight.clone()
    with pytest.raises(RuntimeError, match="packed bytes without their quantization state"):
        layer.load_state_dict({"weight": sd["weight"], "bias": sd["bias"]})
    assert torch.equal(layer.weight, before)
