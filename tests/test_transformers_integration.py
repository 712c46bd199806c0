"""The transformers integration on tiny random Llama and Phi-3 models (built from configs):
quantization on load with our kernels, save/reload with bitsandbytes' keys, bitsandbytes
checkpoints loaded without bitsandbytes, PEFT + HF Trainer training, and bad checkpoints."""
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import qlora_kernels as qk
from qlora_kernels.integrations import transformers as qkt
from qlora_kernels.integrations.transformers import QLoraKernelsConfig
from qlora_kernels.nn import Linear4bit

from .hf_models import TARGETS, batch, tiny_model

ARCHS = ["llama", "phi3"]
# NF4 keeps ~3 bits of each weight: on these random models the logits of the 4-bit model
# are ~0.10 (relative, Frobenius) from the fp32 model's. Twice that is the bound.
NF4_LOGIT_RTOL = 0.2
FP32_RTOL = 1e-5  # same weights, different summation order; relative to the largest |logit|


def close(a, b, rtol=FP32_RTOL):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} vs magnitude {scale:.3g}"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


IDS = batch(seed=1)["input_ids"]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """{arch: (checkpoint dir, fp32 model)}"""
    root = tmp_path_factory.mktemp("fp32")
    out = {}
    for arch in ARCHS:
        model = tiny_model(arch)
        model.save_pretrained(root / arch)
        out[arch] = (root / arch, model)
    return out


# -- (a) quantization on load -------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant_type,blocksize,double_quant", [("nf4", 64, True), ("fp4", 128, False)])
def test_from_pretrained_quantizes_with_our_kernels(fp32, arch, quant_type, blocksize, double_quant):
    path, ref = fp32[arch]
    q = load(path, quantization_config=QLoraKernelsConfig(quant_type, blocksize, double_quant))
    linears = {n: m for n, m in ref.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    assert set(layers(q)) == set(linears) and type(q.lm_head) is torch.nn.Linear
    dense = copy.deepcopy(ref)
    for name, layer in layers(q).items():
        packed, state = qk.quantize_4bit(linears[name].weight.detach(), quant_type, blocksize, double_quant)
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
        assert torch.equal(layer.weight, packed) and layer.quant_state == state
        dense.get_submodule(name).weight.data = qk.dequantize_4bit(packed, state)
    close(logits(q, IDS), logits(dense, IDS))  # the 4-bit layers compute x @ dequant(W).T
    err = (logits(q, IDS) - logits(ref, IDS)).norm() / logits(ref, IDS).norm()
    assert err < NF4_LOGIT_RTOL
    assert q.is_quantized and q.hf_quantizer.is_trainable and q.hf_quantizer.is_qat_trainable


def test_dequantize_gives_dense_linears(fp32):
    q = load(fp32["llama"][0], quantization_config=QLoraKernelsConfig())
    before, packed = logits(q, IDS), {n: m.dequantize() for n, m in layers(q).items()}
    q.dequantize()
    assert not layers(q) and not hasattr(q.config, "quantization_config")
    assert all(torch.equal(q.get_submodule(n).weight, w) for n, w in packed.items())
    close(logits(q, IDS), before)


def test_fuse_loss_option_installs_the_fused_head(fp32):
    from qlora_kernels.integrations.hf_loss import is_fused

    q = load(fp32["llama"][0], quantization_config=QLoraKernelsConfig(fuse_loss=True))
    assert is_fused(q) and not is_fused(load(fp32["llama"][0], quantization_config=QLoraKernelsConfig()))
    q.train()
    out = q(input_ids=IDS, labels=IDS)
    assert out.logits is None and torch.isfinite(out.loss)


def test_config_json_round_trip_and_bad_options():
    cfg = QLoraKernelsConfig("fp4", 128, False, "bfloat16", skip_modules=["lm_head", "o_proj"])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d == {"quant_method": "qlora_kernels", "quant_type": "fp4", "blocksize": 128, "double_quant": False,
                 "fuse_loss": False, "compute_dtype": "bfloat16", "skip_modules": ["lm_head", "o_proj"]}
    back = QLoraKernelsConfig.from_dict(d)
    assert back.to_dict() == d and back.compute_dtype is torch.bfloat16
    for bad, match in [(dict(quant_type="int4"), "quant_type"), (dict(blocksize=100), "blocksize"),
                       (dict(double_quant=1), "double_quant"), (dict(fuse_loss="yes"), "fuse_loss"), (dict(compute_dtype="int8"), "compute_dtype"),
                       (dict(group_size=32), "unknown options"), (dict(quant_method="bitsandbytes"), "quant_method")]:
        with pytest.raises((ValueError, TypeError), match=match):
            QLoraKernelsConfig(**bad)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float16, llm_int8_skip_modules=["head"])
    assert QLoraKernelsConfig.from_bitsandbytes(bnb).to_dict() == QLoraKernelsConfig(
        "nf4", 64, True, torch.float16, ["head"]).to_dict()
    with pytest.raises(ValueError, match="4-bit"):
        QLoraKernelsConfig.from_bitsandbytes(BitsAndBytesConfig(load_in_8bit=True))


# -- (b) save_pretrained -> from_pretrained -----------------------------------------------
def bnb_keys(double_quant: bool) -> set:
    keys = {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}
    return keys | ({"weight.nested_absmax", "weight.nested_quant_map"} if double_quant else set())


@pytest.mark.parametrize("arch,double_quant", [("llama", True), ("phi3", False)])
def test_save_and_reload_round_trip_with_bitsandbytes_keys(fp32, tmp_path, arch, double_quant):
    cfg = QLoraKernelsConfig(double_quant=double_quant)
    q = load(fp32[arch][0], quantization_config=cfg)
    q.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    for name in layers(q):
        assert {k[len(name) + 1:] for k in saved if k.startswith(name + ".")} == bnb_keys(double_quant), name
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == cfg.to_dict()

    r = load(tmp_path)  # the config.json alone selects our quantizer
    assert isinstance(r.config.quantization_config, QLoraKernelsConfig)
    assert layers(r).keys() == layers(q).keys()
    assert all(torch.equal(layers(r)[n].weight, m.weight) and layers(r)[n].quant_state == m.quant_state
               for n, m in layers(q).items())
    assert torch.equal(logits(r, IDS), logits(q, IDS))
    # a model loaded from the 4-bit checkpoint saves again (transformers 5.25 reversed the load
    # converter on save: NotImplementedError) to the same bytes
    r.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    assert torch.equal(logits(load(tmp_path / "again"), IDS), logits(q, IDS))

    # bitsandbytes reads the same checkpoint once config.json names its own method
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"]).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    b = AutoModelForCausalLM.from_pretrained(tmp_path).train()  # train(): bitsandbytes' fp32 path, see (c)
    assert all(torch.equal(b.get_submodule(n).weight.data, m.weight) for n, m in layers(q).items())
    close(logits(b, IDS), logits(q, IDS))


# -- (c) bitsandbytes checkpoints, loaded without bitsandbytes --------------------------------
BNB_CASES = [("llama", True, "uint8"), ("llama", False, "uint8"), ("phi3", True, "uint8"), ("phi3", False, "uint8"),
             ("llama", True, "bfloat16")]

_NO_BNB_LOADER = textwrap.dedent("""
    import sys
    sys.modules["bitsandbytes"] = None  # any `import bitsandbytes` now raises ImportError
    import json, torch
    from transformers import AutoModelForCausalLM
    import qlora_kernels.integrations.transformers as qkt
    from qlora_kernels.nn import Linear4bit
    jobs, ids = json.loads(sys.argv[1]), torch.load(sys.argv[2])
    out = {}
    for name, path in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(path, config=qkt.config_from_bitsandbytes(path)).eval()
        with torch.no_grad():
            logits = model(ids).logits
        out[name] = {"logits": logits, "packed": {n: m.weight.detach().clone() for n, m in model.named_modules()
                                                  if isinstance(m, Linear4bit)}}
    out["bitsandbytes_loaded"] = sys.modules["bitsandbytes"] is not None
    torch.save(out, sys.argv[3])
""")


@pytest.fixture(scope="module")
def bnb_loaded_without_bnb(fp32, tmp_path_factory):
    """Checkpoints written by transformers + bitsandbytes, with bitsandbytes' packed bytes and
    logits; then one subprocess, where bitsandbytes cannot be imported, loads them all."""
    root = tmp_path_factory.mktemp("bnb")
    ref, jobs = {}, {}
    for arch, dq, storage in BNB_CASES:
        name = f"{arch}-dq{int(dq)}-{storage}"
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                                 bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=getattr(torch, storage))
        model = AutoModelForCausalLM.from_pretrained(fp32[arch][0], quantization_config=bnb)
        # bitsandbytes' Linear4bit in eval mode on an AVX512-BF16 CPU repacks its weight and
        # multiplies in bf16; in train mode it decodes to fp32 and multiplies in fp32, as we do.
        model.train()
        packed = {n: m.weight.data.view(torch.uint8).reshape(-1, 1).clone() for n, m in model.named_modules()
                  if type(m).__name__ == "Linear4bit"}
        ref[name] = {"logits": logits(model, IDS), "packed": packed}
        model.save_pretrained(root / name)
        jobs[name] = str(root / name)
    torch.save(IDS, root / "ids.pt")
    subprocess.run([sys.executable, "-c", _NO_BNB_LOADER, json.dumps(jobs), str(root / "ids.pt"), str(root / "out.pt")],
                   check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)
    return ref, torch.load(root / "out.pt")


@pytest.mark.parametrize("arch,double_quant,storage", BNB_CASES)
def test_bitsandbytes_checkpoint_loads_without_bitsandbytes(bnb_loaded_without_bnb, arch, double_quant, storage):
    ref, ours = bnb_loaded_without_bnb
    name = f"{arch}-dq{int(double_quant)}-{storage}"
    assert not ours["bitsandbytes_loaded"]
    assert ours[name]["packed"].keys() == ref[name]["packed"].keys() and ours[name]["packed"]
    for layer, packed in ref[name]["packed"].items():
        assert torch.equal(ours[name]["packed"][layer], packed), layer
    # Bit-identical on this machine today; the bound allows another summation order.
    close(ours[name]["logits"], ref[name]["logits"])


# -- (d) PEFT + HF Trainer -------------------------------------------------------------------
def train(model, tmp_path, steps=6, lr=1e-2, checkpointing=False):
    import inspect

    from transformers import Trainer, TrainingArguments

    # transformers 5.25 renamed the argument (the old name warns that it goes in v6)
    ckpt = ("activation_checkpointing" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
            else "gradient_checkpointing")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, learning_rate=lr, logging_steps=1,
                             per_device_train_batch_size=2, use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, seed=0, **{ckpt: checkpointing})
    b = batch(seed=3)
    data = [{"input_ids": i, "labels": i} for i in b["input_ids"]]  # one fixed batch, learned step by step
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()  # one fixed batch: the loss must fall at every step
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("arch,checkpointing", [("llama", False), ("phi3", True)])
def test_prepare_kbit_peft_lora_and_trainer(fp32, tmp_path, arch, checkpointing):
    from peft import LoraConfig, prepare_model_for_kbit_training

    from qlora_kernels.integrations.peft import get_peft_model

    from qlora_kernels.integrations.peft import QKLoraLinear

    model = load(fp32[arch][0], quantization_config=QLoraKernelsConfig())
    before = {n: m.weight.detach().clone() for n, m in layers(model).items()}
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[arch], lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    wrapped = [m for m in model.modules() if isinstance(m, QKLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS[arch]) and all(isinstance(m.get_base_layer(), Linear4bit) for m in wrapped)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n}
    # prepare_model_for_kbit_training turns on gradient checkpointing only for models marked
    # is_loaded_in_4bit (bitsandbytes'); ours asks for it through the Trainer's arguments.
    losses = train(model, tmp_path, checkpointing=checkpointing)
    assert model.base_model.model.is_gradient_checkpointing == checkpointing
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])), losses
    after = [m.weight for m in layers(model).values()]  # same order, under PEFT's names
    assert len(after) == len(before) and all(
        a.dtype == torch.uint8 and torch.equal(a, b) for a, b in zip(after, before.values()))


def test_prepare_kbit_keeps_packed_bytes_of_a_bf16_model(fp32):
    from peft import prepare_model_for_kbit_training

    model = load(fp32["llama"][0], quantization_config=QLoraKernelsConfig(), dtype=torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    before = {n: m.weight.detach().clone() for n, m in layers(model).items()}
    prepare_model_for_kbit_training(model)
    assert model.model.norm.weight.dtype == torch.float32  # what PEFT does to fp16/bf16 weights...
    assert all(torch.equal(m.weight, before[n]) and m.weight.dtype == torch.uint8 for n, m in layers(model).items())
    assert torch.isfinite(logits(model, IDS)).all()  # ...while the packed bytes stay bytes


def test_trainer_accepts_hand_attached_lora_linear(fp32, tmp_path):
    # Without PEFT the Trainer needs the quantizer's is_qat_trainable to accept the model.
    model = load(fp32["llama"][0], quantization_config=QLoraKernelsConfig())
    model.requires_grad_(False)
    for name in [n for n in layers(model) if n.endswith(("q_proj", "v_proj"))]:
        model.set_submodule(name, qk.nn.LoraLinear(model.get_submodule(name), r=4, lora_alpha=8))
    losses = train(model, tmp_path)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


# -- (e) bad checkpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours_saved(fp32, tmp_path_factory):
    path = tmp_path_factory.mktemp("ours") / "llama"
    load(fp32["llama"][0], quantization_config=QLoraKernelsConfig()).save_pretrained(path)
    return path


L0 = "model.layers.0.self_attn."


def _replace_json(t: torch.Tensor, **changes) -> torch.Tensor:
    d = json.loads(bytes(t.tolist()))
    d.update(changes)
    return torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)


def _drop(sd, prefix):
    for k in [k for k in sd if k.startswith(prefix)]:
        del sd[k]


QS = ".weight.quant_state.bitsandbytes__nf4"
TAMPER = {
    "packed-too-short": (lambda sd: sd.update({L0 + "q_proj.weight": sd[L0 + "q_proj.weight"][:-1]}),
                         rf"{L0}q_proj\.weight: packed weight has 2047 bytes"),
    "state-of-another-shape": (lambda sd: sd.update({L0 + "k_proj" + QS: sd[L0 + "q_proj" + QS].clone()}),
                               rf"{L0}k_proj{QS}: quantization state is for shape \(64, 64\), this layer's weight is "
                               r"\[32, 64\]"),
    "shape-in-json": (lambda sd: sd.update({L0 + "v_proj" + QS: _replace_json(sd[L0 + "v_proj" + QS], shape=[64, 32])}),
                      rf"{L0}v_proj{QS}: quantization state is for shape \(64, 32\)"),
    "absmax-count": (lambda sd: sd.update({L0 + "o_proj.weight.absmax": sd[L0 + "o_proj.weight.absmax"][:-1]}),
                     rf"{L0}o_proj\.weight\.absmax: expected 64 torch.uint8 values"),
    "quant-map": (lambda sd: sd.update({L0 + "q_proj.weight.quant_map": sd[L0 + "q_proj.weight.quant_map"] * 2}),
                  rf"{L0}q_proj\.weight\.quant_map: not the nf4 codebook"),
    "nested-absmax-nan": (lambda sd: sd[L0 + "q_proj.weight.nested_absmax"].fill_(float("nan")),
                          rf"{L0}q_proj\.weight\.nested_absmax: holds NaN"),
    "garbage-json": (lambda sd: sd.update({L0 + "q_proj" + QS: torch.full((8,), 255, dtype=torch.uint8)}),
                     rf"{L0}q_proj{QS}: unreadable quantization state"),
    "no-packed-weight": (lambda sd: sd.pop(L0 + "k_proj.weight"), rf"{L0}k_proj\.weight: missing"),
    "state-dropped": (lambda sd: _drop(sd, L0 + "o_proj.weight."),
                      rf"{L0}o_proj\.weight: the checkpoint stores this layer without its 4-bit quantization state"),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_bad_checkpoint_names_the_key(ours_saved, tmp_path, case):
    shutil.copytree(ours_saved, tmp_path, dirs_exist_ok=True)
    sd = load_file(tmp_path / "model.safetensors")
    TAMPER[case][0](sd)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=TAMPER[case][1]):
        load(tmp_path)


def test_four_bit_state_for_a_module_kept_in_full_precision(ours_saved, tmp_path):
    shutil.copytree(ours_saved, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["skip_modules"] = ["lm_head", "o_proj"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight: the checkpoint stores it in "
                                         r"4-bit but this model keeps Linear unquantized"):
        load(tmp_path)


def test_bad_state_caught_while_loading_too(ours_saved, tmp_path, monkeypatch):
    # Without the up-front check (e.g. a checkpoint that is not safetensors), the loading op
    # raises the same error; transformers reports it and from_pretrained returns no model.
    monkeypatch.setattr(qkt, "_validate_checkpoint_files", lambda model, files: None)
    shutil.copytree(ours_saved, tmp_path, dirs_exist_ok=True)
    sd = load_file(tmp_path / "model.safetensors")
    TAMPER["state-of-another-shape"][0](sd)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    report = logging.Handler()
    report.emit = lambda record: report.records.append(record.getMessage())
    report.records = []
    import transformers.utils.logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()  # an earlier test or the environment may have silenced it
    logging.getLogger("transformers").addHandler(report)  # it does not propagate to pytest's
    try:
        with pytest.raises(RuntimeError, match="conversion") as excinfo:
            load(tmp_path)
    finally:
        logging.getLogger("transformers").removeHandler(report)
        hf_logging.set_verbosity(verbosity)
    # transformers' report names the layer (how much of our message it shows varies by version)
    assert "k_proj" in "".join(report.records) + str(excinfo.value)


def test_native_decode_on_a_model_loaded_with_our_config(fp32):
    """The README's route: from_pretrained(..., QLoraKernelsConfig()), then the native decode
    step. transformers' layers are built without Linear4bit.__init__ and once lacked its
    ``compute`` attribute (AttributeError at enable_native_decode)."""
    from qlora_kernels.integrations import hf_decode

    q = load(fp32["llama"][0], quantization_config=QLoraKernelsConfig())
    prompt = IDS[:1, :5]
    with torch.no_grad():
        want = q.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, cache_implementation="static")
    hf_decode.enable_native_decode(q)
    with torch.no_grad():
        got = q.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, cache_implementation="static")
    st = hf_decode.status(q)
    assert st["steps"] >= 3 and st["fallbacks"] == 0, st
    assert torch.equal(got, want)
