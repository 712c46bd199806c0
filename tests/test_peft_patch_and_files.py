"""patch_peft_model on PEFT models built over bitsandbytes and dense bases; adapter files
interchange with stock PEFT in both directions; merge/unmerge; adapters API; bad input."""
import copy
import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.integrations import peft as qk_peft
from qlora_kernels.integrations.peft import QKLoraLinear

from .hf_models import TARGETS, batch, tiny_model
from .test_peft_integration import bnb_quantize, close, pair

def _peft(model, **kw):
    from peft import LoraConfig

    from qlora_kernels.integrations.peft import get_peft_model

    cfg = dict(r=8, lora_alpha=16, target_modules=TARGETS["llama"], init_lora_weights=False)
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(**cfg))


@pytest.mark.parametrize("kind", ["bnb4", "dense"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_patch_peft_model_keeps_outputs_and_trains(kind, use_dora):
    base = tiny_model("llama")
    model = bnb_quantize(copy.deepcopy(base)) if kind == "bnb4" else copy.deepcopy(base)
    pm = _peft(model, use_dora=use_dora)
    b = batch()
    before = pm(**b).logits.detach()
    ids = {n: id(p) for n, p in pm.named_parameters() if p.requires_grad}
    qk.patch_peft_model(pm)
    assert sum(isinstance(m, QKLoraLinear) for m in pm.modules()) == 14
    close(pm(**b).logits, before, "logits after patching")
    # the trained tensors are the same objects: optimizers built before patching still work
    assert {n: id(p) for n, p in pm.named_parameters() if p.requires_grad} == ids
    loss = pm(**b).loss
    loss.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)


def test_patch_leaves_layers_of_other_variants_to_peft():
    """Our layer runs plain LoRA and DoRA; a layer with another PEFT variant (aLoRA here) was
    once turned into a DoRA layer."""
    from peft.tuners.lora.variants import ALoraLinearVariant

    pm = _peft(copy.deepcopy(tiny_model("llama")))
    q = pm.get_base_model().model.layers[0].self_attn.q_proj
    q.lora_variant["default"] = ALoraLinearVariant()
    qk.patch_peft_model(pm)
    assert sum(isinstance(m, QKLoraLinear) for m in pm.modules()) == 13
    q = pm.get_base_model().model.layers[0].self_attn.q_proj
    assert not isinstance(q, QKLoraLinear) and isinstance(q.lora_variant["default"], ALoraLinearVariant)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapter_files_interchange_with_stock_peft(tmp_path, use_dora):
    from peft import PeftModel

    ours, theirs = pair("llama", use_dora)
    b = batch()
    # train ours a little so the adapter is not the initial one
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for s in range(2):
        opt.zero_grad()
        ours(**batch(seed=20 + s)).loss.backward()
        opt.step()
    ours.save_pretrained(tmp_path / "ours")
    files = {p.name for p in (tmp_path / "ours").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
    assert any(k.endswith("lora_A.weight") for k in keys) and any(k.endswith("lora_B.weight") for k in keys)
    assert any(k.endswith("lora_magnitude_vector") for k in keys) == use_dora
    ref = ours(**b).logits.detach()
    base = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_bnb = PeftModel.from_pretrained(bnb_quantize(copy.deepcopy(base)), tmp_path / "ours")
        on_dense = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        on_ours = qk_peft.from_pretrained(qk.quantize_model(copy.deepcopy(base), double_quant=True), tmp_path / "ours")
    # Train mode (dropout is 0): in eval mode on AVX512-BF16 CPUs bitsandbytes repacks the
    # weight for a bf16 GEMV, which is not the fp32 computation being compared.
    for m in (on_bnb, on_dense, on_ours):
        m.train()
    close(on_bnb(**b).logits, ref, "stock PEFT on bitsandbytes")
    close(on_ours(**b).logits, ref, "ours reloaded")
    # On the dense base the only difference is NF4's: bound it by the gap between the two
    # bases without adapters.
    plain_gap = (base(**b).logits - qk.quantize_model(copy.deepcopy(base), double_quant=True)(**b).logits).abs().max()
    assert (on_dense(**b).logits - ref).abs().max() <= 1.5 * plain_gap
    # reverse: an adapter trained/saved by stock PEFT on bitsandbytes loads into ours
    theirs.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = qk_peft.from_pretrained(qk.quantize_model(copy.deepcopy(base), double_quant=True), tmp_path / "theirs")
    assert sum(isinstance(m, QKLoraLinear) for m in mine.modules()) == 14
    mine.train()
    close(mine(**b).logits, theirs(**b).logits, "stock adapter on ours")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_and_unload(use_dora):
    """Merging dequantizes, adds and requantizes exactly as PEFT does on bitsandbytes (our
    bytes are bitsandbytes' bytes), so both merged models agree; the merged model's
    distance from the unmerged one is the requantization error, bounded by the base's own
    NF4 error: one more quantization of an already quantized weight (2.5x the base's gap;
    unmerging requantizes once more)."""
    ours, theirs = pair("llama", use_dora)
    with torch.no_grad():  # a trained-size adapter: a small delta, as in practice
        for m in (ours, theirs):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
    ours.train(), theirs.train()
    b = batch()
    ref = ours(**b).logits.detach()
    base = tiny_model("llama")
    nf4_gap = (base(**b).logits - qk.quantize_model(copy.deepcopy(base), double_quant=True)(**b).logits).abs().max()
    with pytest.warns(UserWarning, match="Merge lora module to 4-bit linear"):
        ours.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.merge_adapter()
    merged = ours(**b).logits.detach()
    close(merged, theirs(**b).logits, "merged vs PEFT+bitsandbytes merged", rtol=1e-3)
    assert (merged - ref).abs().max() <= 2.5 * nf4_gap
    with pytest.warns(UserWarning, match="Unmerge lora module to 4-bit linear"):
        ours.unmerge_adapter()
    assert (ours(**b).logits - ref).abs().max() <= 3.5 * nf4_gap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unloaded = ours.merge_and_unload()
    assert not any(isinstance(m, QKLoraLinear) for m in unloaded.modules())
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, qk.nn.Linear4bit)
    assert (unloaded(**b).logits - ref).abs().max() <= 4.5 * nf4_gap


def test_adapter_api_disable_switch_mixed_batch():
    from peft import LoraConfig

    ours, _ = pair("llama", False)
    b = batch()
    with_adapter = ours(**b).logits.detach()
    with ours.disable_adapter():
        base_only = ours(**b).logits.detach()
    plain = qk.quantize_model(tiny_model("llama"), double_quant=True)
    close(base_only, plain(**b).logits, "disable_adapter")
    ours.add_adapter("second", qk_peft.register(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS["llama"],
                                                           lora_dropout=0.1, use_rslora=True, init_lora_weights=False)))
    ours.set_adapter("second")
    ours.eval()
    second = ours(**b).logits.detach()
    assert not torch.allclose(second, with_adapter)
    mixed = ours(input_ids=b["input_ids"], adapter_names=["default", "second"]).logits
    close(mixed[0], with_adapter[0], "mixed batch row 0 (default)")
    close(mixed[1], second[1], "mixed batch row 1 (second)")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["second"] == 4 / 2  # rsLoRA: alpha / sqrt(r)


def test_lora_bias_runs_the_unfused_path():
    pm = _peft(qk.quantize_model(tiny_model("llama"), double_quant=True), lora_bias=True)
    out = pm(**batch())
    out.loss.backward()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QKLoraLinear) and layer.lora_B["default"].bias.grad is not None


def test_bad_targets_and_adapter_files(tmp_path):
    with pytest.raises(ValueError, match="Target module SiLUActivation.*is not supported"):
        _peft(qk.quantize_model(tiny_model("llama")), target_modules=["act_fn"])
    ours, _ = pair("llama", False)
    ours.save_pretrained(tmp_path / "a")
    from transformers import AutoModelForCausalLM

    from .hf_models import tiny_config

    cfg = tiny_config("llama")
    cfg.intermediate_size = 192  # another base shape: gate/up/down differ
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(RuntimeError, match=r"size mismatch for .*mlp\.gate_proj\.lora_B"):
        qk_peft.from_pretrained(qk.quantize_model(other), tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(Exception, match="adapter_model.safetensors|header|deserializ|incomplete|Error"):
        qk_peft.from_pretrained(qk.quantize_model(tiny_model("llama")), tmp_path / "a")


def test_peft_is_registered_on_the_config_not_patched():
    """PEFT reaches our fused layer through its custom-module registration on the config:
    importing the integration, quantizing and building PEFT models change none of PEFT's
    classes, and a config that was not registered gets PEFT's own dispatch (which does not
    know our Linear4bit and says so)."""
    import peft
    from peft import LoraConfig
    from peft.tuners.lora.model import LoraModel

    before = {cls: dict(vars(cls)) for cls in (LoraModel, LoraConfig)}
    model = qk.quantize_model(tiny_model("llama"))
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    ours = qk_peft.get_peft_model(copy.deepcopy(model), LoraConfig(**cfg))
    assert all(isinstance(m, QKLoraLinear) for n, m in ours.named_modules() if n.endswith("q_proj"))
    assert {cls: dict(vars(cls)) for cls in before} == before
    with pytest.raises(ValueError, match="Target module Linear4bit.*is not supported"):
        peft.get_peft_model(model, LoraConfig(**cfg))
    with pytest.raises(TypeError, match="config must be a peft.LoraConfig"):
        qk_peft.register(dict(cfg))


def _dense_pair(first: dict, second: dict | None = None, bias: bool = True):
    """Stock PEFT on one dense nn.Linear and a patched copy (the same tensors): any difference
    is our layer's logic."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 32, bias=bias)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False, **first))
        if second is not None:
            theirs.add_adapter("b", LoraConfig(r=2, lora_alpha=5, target_modules=["0"], init_lora_weights=False,
                                               **second))
            theirs.base_model.set_adapter(["default", "b"])
    ours = qk.patch_peft_model(copy.deepcopy(theirs))
    assert isinstance(ours.base_model.model[0], QKLoraLinear)
    return ours, theirs


@pytest.mark.parametrize("first", [{}, {"use_dora": True}], ids=["lora+dora", "dora+dora"])
def test_a_dora_adapter_after_another_active_one_keeps_its_output(first):
    # The DoRA term took result - bias for the base output: the adapters before it were dropped
    # (1.55 off PEFT); PEFT scales them by (m/|W+sBA| - 1) with the base.
    ours, theirs = _dense_pair(first, {"use_dora": True})
    x = torch.randn(4, 64, requires_grad=True)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        y_ours, y_theirs = ours(x), theirs(x)
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
        g_ours = torch.autograd.grad(y_ours.square().sum(), [x, *[p for p in ours.parameters() if p.requires_grad]])
        g_theirs = torch.autograd.grad(y_theirs.square().sum(),
                                       [x, *[p for p in theirs.parameters() if p.requires_grad]])
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_merging_adapters_in_turn_gives_peft_merged_weights():
    # A DoRA merge after another merged adapter took its norm from the weight holding that
    # adapter (0.155 off PEFT's merged weight); a lora_bias merge added the bias unscaled
    # (the merged output 2.4 off the unmerged one at scaling 2).
    x = torch.randn(4, 64)
    for first, second in (({"use_dora": True}, {"use_dora": True}), ({}, {"use_dora": True}),
                          ({"lora_bias": True}, None)):
        ours, theirs = _dense_pair(first, second)
        with torch.no_grad():
            for m in (ours, theirs):
                for n, p in m.named_parameters():
                    if "lora_B" in n and n.endswith("bias"):
                        p.copy_(torch.linspace(-1, 1, p.numel()))
        ours.eval(), theirs.eval()
        before = ours(x).detach()
        torch.testing.assert_close(before, theirs(x), rtol=1e-5, atol=1e-5)
        ours.base_model.model[0].merge(), theirs.base_model.model[0].merge()
        w_ours, w_theirs = ours.base_model.model[0].base_layer.weight, theirs.base_model.model[0].base_layer.weight
        torch.testing.assert_close(w_ours, w_theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)
        ours.base_model.model[0].unmerge()
        torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)
    ours, _ = _dense_pair({"lora_bias": True}, bias=False)
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        ours.base_model.model[0].merge()


def test_a_dora_model_merged_by_peft_unmerges_after_patching():
    # PEFT caches the norm as '<adapter>-weight_norm'; our unmerge looked for its own key only
    ours, theirs = _dense_pair({"use_dora": True})
    x = torch.randn(4, 64)
    theirs.eval()
    before = theirs(x).detach()
    theirs.base_model.model[0].merge()
    patched = qk.patch_peft_model(theirs)
    patched.base_model.model[0].unmerge()
    torch.testing.assert_close(patched(x), before, rtol=1e-5, atol=1e-5)


def test_compute_int8_of_the_base_holds_under_a_lora_adapter():
    # The fused LoRA path ran the base in fp32 whatever its compute: an adapter silently undid
    # compute="int8", and ONNX Runtime's accuracy_level=4 export (MatMul4bitInt8) then no
    # longer matched the torch model it came from.
    from peft import LoraConfig

    torch.manual_seed(0)
    base = qk.nn.Linear4bit.from_linear(torch.nn.Linear(128, 64), compute="int8")
    pm = qk_peft.get_peft_model(torch.nn.Sequential(base), LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                      init_lora_weights=False))
    layer = pm.base_model.model[0]
    assert isinstance(layer, QKLoraLinear)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    for rows in (1, 5):
        x = torch.randn(rows, 128)
        want = qk.linear_4bit(x, base.weight, base.quant_state, base.bias, compute="int8") + 2.0 * (x @ A.t()) @ B.t()
        for train in (False, True):
            pm.train(train)
            torch.testing.assert_close(pm(x), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(qk.linear_4bit(x, base.weight, base.quant_state, base.bias), want - 2.0 * (x @ A.t()) @ B.t())
