"""The fused output head + loss inside transformers causal LMs (integrations.hf_loss), with
PEFT LoRA on our 4-bit layers: the same loss and adapter gradients as transformers' own
loss, the original forward wherever the fused one does not apply."""
import copy
import inspect
import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.integrations import hf_loss

from .hf_models import TARGETS, batch, tiny_model


def _peft(arch: str, fuse: bool, **lora):
    from peft import LoraConfig

    from qlora_kernels.integrations.peft import get_peft_model

    model = qk.quantize_model(tiny_model(arch), fuse_loss=fuse)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_dropout=0.0, init_lora_weights=False,
                     **lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, cfg)
    pm.train()
    return pm


def _loss_and_grads(pm, **kw):
    out = pm(**batch(), **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_fused_loss_matches_transformers_loss(arch):
    fused, plain = _peft(arch, True), _peft(arch, False)
    assert hf_loss.is_fused(fused) and not hf_loss.is_fused(plain)
    out_f, g_f = _loss_and_grads(fused)
    out_p, g_p = _loss_and_grads(plain)
    assert out_f.logits is None and out_p.logits is not None
    torch.testing.assert_close(out_f.loss, out_p.loss, rtol=1e-5, atol=1e-6)
    assert g_f.keys() == g_p.keys() and len(g_f) > 0
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_p[n], rtol=1e-4, atol=1e-6, msg=n)


def test_num_items_in_batch_and_padding_labels():
    """transformers' gradient-accumulation convention (sum / num_items_in_batch) and
    ignore_index rows, as the Trainer passes them."""
    fused, plain = _peft("phi3", True), _peft("phi3", False)
    b = batch()
    b["labels"][:, :5] = -100
    n = torch.tensor(11)
    losses = [m(**b, num_items_in_batch=n).loss for m in (fused, plain)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_evaluation_and_generation_use_the_original_forward():
    fused, plain = _peft("llama", True), _peft("llama", False)
    for m in (fused, plain):
        m.eval()
    with torch.no_grad():
        a, b = fused(**batch()), plain(**batch())
    assert a.logits is not None
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.loss, b.loss)
    fused.train()
    with torch.no_grad():  # training mode without autograd: nothing to fuse
        assert fused(**batch()).logits is not None
    assert fused(input_ids=batch()["input_ids"]).logits is not None  # no labels
    ids = batch()["input_ids"][:1, :4]
    fused.eval()
    plain.eval()
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(input_ids=ids, **kw), plain.generate(input_ids=ids, **kw))


def test_trainable_head_falls_back_to_the_original_forward():
    """modules_to_save wraps lm_head: the head trains, so the fused path (frozen plain
    nn.Linear only) steps aside and the head gets its gradient the usual way."""
    pm = _peft("phi3", True, modules_to_save=["lm_head"])
    out, grads = _loss_and_grads(pm)
    assert out.logits is not None
    assert any("lm_head" in n for n in grads)


def test_unsupported_models_are_left_alone():
    m = tiny_model("llama")
    m.config.final_logit_softcapping = 30.0  # Gemma-2 style: the loss must see capped logits
    assert "final_logit_softcapping" in hf_loss.unsupported_reason(m)
    assert not hf_loss.fuse_loss(m) and not hf_loss.is_fused(m)
    assert "not a transformers model" in hf_loss.unsupported_reason(torch.nn.Linear(2, 2))
    # where vision-language models keep the cap (Gemma 3n/4, PaliGemma 2: the text config),
    # a cap set on the module, and logits cut to an unpadded vocabulary (Inkling): each was fused
    m = tiny_model("llama")
    text = copy.deepcopy(m.config)
    text.final_logit_softcapping = 30.0
    m.config.get_text_config = lambda decoder=False: text
    assert "config.final_logit_softcapping=30.0" in hf_loss.unsupported_reason(m)
    m = tiny_model("llama")
    m.logit_softcap = 15.0
    assert "logit_softcap=15.0" in hf_loss.unsupported_reason(m)
    m = tiny_model("llama")
    m.config.unpadded_vocab_size = m.config.vocab_size - 28
    assert "unpadded_vocab_size" in hf_loss.unsupported_reason(m) and not hf_loss.fuse_loss(m)


def test_fused_model_copies_and_unfuses():
    m = qk.quantize_model(tiny_model("phi3"), fuse_loss=True)
    m.train()
    c = copy.deepcopy(m)
    assert hf_loss.is_fused(c) and c.forward.__self__ is c
    assert "input_ids" in inspect.signature(c.forward).parameters  # what the Trainer reads
    assert c(**batch()).logits is None
    hf_loss.unfuse_loss(c)
    assert not hf_loss.is_fused(c) and c(**batch()).logits is not None
    assert m(**batch()).logits is None  # the original keeps its own forward


def test_trainer_step_with_fused_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    pm = _peft("phi3", True)
    ids = batch(b=8)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    result = Trainer(model=pm, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in pm.named_parameters() if p.requires_grad)


def test_a_batch_without_labelled_tokens_gives_zero_gradients_as_transformers():
    # every label -100 (completion-only labels cut by truncation): transformers' loss is NaN
    # and its gradients 0; ours divided the in-forward gradients by 0: NaN in every gradient,
    # which the next optimizer step writes into every trainable weight
    fused, plain = _peft("llama", True), _peft("llama", False)
    b = batch()
    b["labels"][:] = -100
    for kw in ({}, {"num_items_in_batch": torch.tensor(0)}):
        res = []
        for pm in (fused, plain):
            out = pm(**b, **kw)
            out.loss.backward()
            res.append((out, {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}))
            pm.zero_grad(set_to_none=True)
        (out_f, g_f), (out_p, g_p) = res
        assert out_f.loss.isnan() and out_p.loss.isnan()
        for n in g_f:
            assert torch.equal(g_f[n], torch.zeros_like(g_f[n])) and torch.equal(g_p[n], g_f[n]), (kw, n)


def test_fused_loss_survives_torch_save_and_a_tensor_logits_to_keep_falls_back(tmp_path):
    # the instance forward was a bound closure: unpickled, it came back as the class's own
    # forward (logits materialised) while is_fused() still said True; a fresh process could
    # not run the fused attention the config names; logits_to_keep as positions scored the
    # wrong labels
    import subprocess
    import sys

    from qlora_kernels.integrations.hf_fuse import fuse_layers

    fused = _peft("llama", True)
    fuse_layers(fused)
    assert str(inspect.signature(fused.get_base_model().forward)).startswith("(input_ids")
    torch.save(fused, tmp_path / "m.pt")
    code = ("import torch, sys; sys.path.insert(0, '.'); from tests.hf_models import batch\n"
            "from qlora_kernels.integrations import hf_loss\n"
            f"m = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False); m.train()\n"
            "out = m(**batch())\n"
            "print(hf_loss.is_fused(m), out.logits is None, float(out.loss))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    fused_now, no_logits, loss = r.stdout.split()[-3:]
    assert fused_now == "True" and no_logits == "True", r.stdout
    assert abs(float(loss) - float(fused(**batch()).loss)) < 1e-5
    with pytest.raises(ValueError):  # transformers' own answer to positions that do not match the labels
        fused(**batch(), logits_to_keep=torch.tensor([0, 5]))
