"""The fused rotary embedding (ops/rope.py, csrc/rope.cpp) on every path this CPU runs:
transformers' apply_rotary_pos_emb to the bit in fp32, forward and both gradients (each
product rounded before the add, as torch does); then the transformers integration
(hf_rope): the same losses and gradients as transformers' function, the kernel running in
the fused model's training step only."""
import copy
import io

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import qlora_kernels as qk
from qlora_kernels.integrations import hf_rope
from qlora_kernels.integrations.hf_fuse import fuse_layers

from .conftest import BACKEND_PATHS, on_path
from .hf_models import batch, lora_peft, tiny_model

IDS = [b if i is None else f"{b}-{i}" for b, i in BACKEND_PATHS]
# (batch, query heads, key/value heads, positions, head size, cos batch): one position, the
# smallest head, odd sizes, grouped queries, a head wider than a vector, cos shared by the batch
SHAPES = [(1, 1, 1, 1, 2, 1), (2, 5, 1, 7, 14, 2), (1, 3, 3, 257, 64, 1), (2, 4, 2, 33, 130, 2),
          (3, 2, 1, 4097, 4, 1)]


def _inputs(B, H, Hk, S, D, Bc, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q and k as transformers passes them: [B, heads, S, D] views of [B, S, heads * D] outputs
    q0 = torch.randn(B, S, H * D, generator=g).requires_grad_()
    k0 = torch.randn(B, S, Hk * D, generator=g).requires_grad_()
    freqs = torch.randn(Bc, S, D // 2, generator=g) * 10
    cos, sin = torch.cat((freqs.cos(), freqs.cos()), -1), torch.cat((freqs.sin(), freqs.sin()), -1)
    dq, dk = torch.randn(B, H, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)
    return q0, k0, cos, sin, dq, dk


def _run(fn, q0, k0, cos, sin, dq, dk, heads, layout=1):
    B, S, _ = q0.shape
    D = cos.shape[-1]
    q, k = q0.view(B, S, heads[0], D), k0.view(B, S, heads[1], D)
    if layout == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    else:
        dq, dk = dq.transpose(1, 2), dk.transpose(1, 2)
    qe, ke = fn(q, k, cos, sin, unsqueeze_dim=layout)
    return (qe, ke, *torch.autograd.grad([qe, ke], [q0, k0], [dq, dk]))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", [1, 2])
@pytest.mark.parametrize("backend,isa", BACKEND_PATHS, ids=IDS)
def test_matches_transformers_bit_for_bit(backend, isa, layout, shape):
    B, H, Hk, S, D, Bc = shape
    args = _inputs(B, H, Hk, S, D, Bc)
    want = _run(apply_rotary_pos_emb, *args, (H, Hk), layout)
    with on_path(backend, isa):
        got = _run(qk.rope, *args, (H, Hk), layout)
    for name, a, e in zip(("q", "k", "dq", "dk"), got, want):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert torch.equal(a, e), (name, float((a - e).abs().max()))
    # the op's outputs are [B, S, heads, D] buffers: a layout=1 result transposes back for free
    if layout == 1:
        assert got[0].transpose(1, 2).is_contiguous() and got[1].transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend,isa", BACKEND_PATHS, ids=IDS)
def test_half_precision_is_fp32_rounded_once(backend, isa):
    q0, k0, cos, sin, dq, dk = _inputs(2, 4, 2, 9, 16, 2)
    q = q0.detach().view(2, 9, 4, 16).transpose(1, 2)
    k = k0.detach().view(2, 9, 2, 16).transpose(1, 2)
    for dtype in (torch.bfloat16, torch.float16):
        qh, kh = q.to(dtype), k.to(dtype)
        want = apply_rotary_pos_emb(qh.float(), kh.float(), cos, sin)
        with on_path(backend, isa):
            got = qk.rope(qh, kh, cos.to(dtype), sin.to(dtype))
            assert got[0].dtype == dtype
        want = apply_rotary_pos_emb(qh.float(), kh.float(), cos.to(dtype).float(), sin.to(dtype).float())
        for a, e in zip(got, want):
            assert torch.equal(a, e.to(dtype))


@pytest.mark.parametrize("backend,isa", BACKEND_PATHS, ids=IDS)
def test_thread_counts_give_the_same_bits(backend, isa):
    args = _inputs(2, 3, 1, 300, 64, 2)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            with on_path(backend, isa):
                results.append(_run(qk.rope, *args, (3, 1)))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))


def test_bad_input_is_named():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cases = [
        ((torch.randn(2, 4, 5, 7), torch.randn(2, 2, 5, 7), cos[..., :7], sin[..., :7]), {}, "even"),
        ((q, torch.randn(3, 2, 5, 8), cos, sin), {}, "k has shape"),
        ((q, k, torch.randn(2, 5, 6), torch.randn(2, 5, 6)), {}, "cos and sin have shape"),
        ((q, k, cos, sin[:1]), {}, "cos has shape"),
        ((q, k, torch.randn(3, 5, 8), torch.randn(3, 5, 8)), {}, "cos and sin have shape"),
        ((q[0], k, cos, sin), {}, "q must be a 4-D"),
        ((q, k, cos, sin), {"unsqueeze_dim": 3}, "unsqueeze_dim"),
    ]
    for args, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            qk.rope(*args, **kw)
    with pytest.raises(TypeError, match="q must be"):
        qk.rope(q.long(), k, cos, sin)


def test_opcheck_and_compile():
    q0, k0, cos, sin, dq, dk = _inputs(2, 4, 2, 9, 16, 2)
    q = q0.detach().view(2, 9, 4, 16).transpose(1, 2).requires_grad_()
    k = k0.detach().view(2, 9, 2, 16).transpose(1, 2).requires_grad_()
    torch.library.opcheck(torch.ops.qlora_kernels.rope, (q, k, cos, sin))
    torch.library.opcheck(torch.ops.qlora_kernels.rope_backward, (dq.transpose(1, 2), dk.transpose(1, 2), cos, sin))
    compiled = torch.compile(lambda *a: qk.rope(*a), fullgraph=True, backend="aot_eager")
    for a, e in zip(compiled(q, k, cos, sin), qk.rope(q, k, cos, sin)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ------------------------------------------------------------- transformers ----

def _rope_calls(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "qlora_kernels::rope")


def _step(pm):
    pm.zero_grad(set_to_none=True)
    out = pm(**batch())
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_fused_model_trains_as_transformers_with_the_kernel(arch):
    """Llama's attention layers hold kernels' private wrappers of the function (switched one
    by one); Phi-3's call a plain module-level function (replaced, inert without the mark)."""
    model = qk.quantize_model(tiny_model(arch), fuse_loss=True)
    summary = fuse_layers(model)
    layers = model.config.num_hidden_layers
    assert summary["rope"] == (layers if arch == "llama" else 1), summary
    pm = lora_peft(model, arch)
    results = {}
    for fused in (True, False):
        if not fused:
            hf_rope.unfuse_rope(pm)
        calls = _rope_calls(lambda: results.__setitem__(fused, _step(pm)))
        assert calls == (layers if fused else 0)
    (lf, gf), (lu, gu) = results[True], results[False]
    assert torch.equal(lf, lu) and gf.keys() == gu.keys()
    for n in gf:
        assert torch.equal(gf[n], gu[n]), n


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_only_the_fused_model_and_only_training(arch):
    """Another model of the same class keeps transformers' function; inference (no autograd,
    generate's decode steps) runs transformers' formula; a fused model saves and loads."""
    base = tiny_model(arch)
    fused = qk.quantize_model(copy.deepcopy(base), fuse_loss=True)
    fuse_layers(fused)
    other = lora_peft(qk.quantize_model(copy.deepcopy(base), fuse_loss=True), arch)
    assert _rope_calls(lambda: other(**batch()).loss.backward()) == 0
    plain = qk.quantize_model(copy.deepcopy(base), fuse_loss=True)
    ids = batch()["input_ids"][:1, :6]
    with torch.no_grad():
        assert _rope_calls(lambda: fused(input_ids=ids)) == 0
        kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(fused.generate(input_ids=ids, **kw), plain.generate(input_ids=ids, **kw))
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, fused(input_ids=ids).logits)
    layers = fused.config.num_hidden_layers
    assert _rope_calls(lambda: back(**batch()).loss.backward()) == layers


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_fusion_survives_kernelize_on_train_and_eval(arch):
    """transformers 5 loads models with ``use_kernels`` on and re-runs ``kernels.kernelize``
    on every train() / eval() that changes the mode; with no kernel mapped for the CPU it
    resets each wrapper to its class's forward. A fusion held as an instance attribute was
    undone by the first ``model.train()`` of every ``from_pretrained`` model (the benchmarks'
    SmolLM2 and ``qlora-kernels finetune`` ran transformers' function)."""
    model = tiny_model(arch)
    model.set_use_kernels(True)  # from_pretrained's default
    assert model.use_kernels
    model = qk.quantize_model(model, fuse_loss=True)
    layers = model.config.num_hidden_layers
    assert fuse_layers(model)["rope"] == (layers if arch == "llama" else 1)
    pm = lora_peft(model, arch)
    from transformers import PreTrainedModel

    runs = []
    real = PreTrainedModel.set_use_kernels  # what train() / eval() call to re-kernelize
    with pytest.MonkeyPatch.context() as m:
        m.setattr(PreTrainedModel, "set_use_kernels", lambda self, *a, **k: (runs.append(a), real(self, *a, **k))[1])
        for mode in ("eval", "train", "eval", "train"):
            getattr(pm, mode)()
    assert len(runs) == 4 and all(a[0] for a in runs)  # kernelize re-ran on every mode change
    assert _rope_calls(lambda: _step(pm)) == layers
    buf = io.BytesIO()
    torch.save(pm, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    back.eval()
    back.train()
    assert _rope_calls(lambda: _step(back)) == layers
    hf_rope.unfuse_rope(pm)
    pm.eval()
    pm.train()
    assert _rope_calls(lambda: _step(pm)) == 0


def test_probe_accepts_transformers_and_refuses_other_rotations():
    assert hf_rope._probe(apply_rotary_pos_emb) is None

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J's layout: pairs (2i, 2i + 1)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)

        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    def fused_add(q, k, cos, sin, unsqueeze_dim=1):  # one rounding less: not the same bits
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        h = q.shape[-1] // 2
        rot = [torch.cat((-x[..., h:], x[..., :h]), -1) for x in (q, k)]
        return (torch.addcmul(q.double() * cos, rot[0].double(), sin).to(q.dtype),
                torch.addcmul(k.double() * cos, rot[1].double(), sin).to(k.dtype))

    for fn in (interleaved, fused_add):
        assert "rotate_half" in hf_rope._probe(fn)


def test_other_signatures_are_left_alone_with_the_reason(monkeypatch):
    """Functions that do not take (q, k, cos, sin) as Llama's does make the probe report, not
    raise: GPT-J's (x, sin, cos), Gemma 4's one tensor with (cos, sin), GPT-OSS's half-width
    cos; fuse_layers then leaves such a model's rotary embedding alone."""
    def gptj(x, sin, cos):
        return x * cos + x * sin

    def one_tensor(x, cos, sin, unsqueeze_dim=1):
        return x * cos.unsqueeze(unsqueeze_dim) + x * sin.unsqueeze(unsqueeze_dim)

    def half_width(q, k, cos, sin, unsqueeze_dim=1):
        h = q.shape[-1] // 2
        c, s = cos.unsqueeze(unsqueeze_dim)[..., :h], sin.unsqueeze(unsqueeze_dim)[..., :h]
        return tuple(torch.cat((x[..., :h] * c - x[..., h:] * s, x[..., h:] * c + x[..., :h] * s), -1) for x in (q, k))

    for fn in (gptj, one_tensor, half_width):
        assert "does not take" in hf_rope._probe(fn) or "rotate_half" in hf_rope._probe(fn), fn.__name__
    import transformers.models.phi3.modeling_phi3 as phi3

    monkeypatch.setattr(phi3, "apply_rotary_pos_emb", gptj)
    model = qk.quantize_model(tiny_model("phi3"), fuse_loss=True)
    summary = fuse_layers(model)
    assert summary["rope"] == 0
    assert any("does not take (q, k, cos, sin)" in why for _, why in summary["skipped"]), summary["skipped"]
    assert phi3.apply_rotary_pos_emb is gptj


def test_cos_with_a_gradient_is_refused_and_not_taken():
    q0, k0, cos, sin, dq, dk = _inputs(1, 2, 1, 5, 8, 1)
    q = q0.view(1, 5, 2, 8).transpose(1, 2)
    k = k0.view(1, 5, 1, 8).transpose(1, 2)
    with pytest.raises(ValueError, match="cos and sin require a gradient"):
        qk.rope(q, k, cos.requires_grad_(), sin)
    assert not hf_rope._takes(q, k, cos, sin, (), {})
    with torch.no_grad():
        qk.rope(q, k, cos, sin)  # no autograd: nothing to refuse
