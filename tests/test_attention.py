"""The fused causal attention (ops/attention.py, csrc/attention_*) on every path this CPU
runs, against torch's scaled_dot_product_attention in fp64: the output and the three
gradients within 4x torch's own fp32 error (its fp32 SDPA against the same fp64 result)
plus 64 u of the result's largest magnitude (u = 2^-24); then the transformers
integration (hf_attention): the same losses and gradients as sdpa, fallbacks counted."""
import copy

import pytest
import torch
import torch.nn.functional as F

import qlora_kernels as qk
from qlora_kernels import _C
from qlora_kernels.integrations import hf_attention
from qlora_kernels.integrations.hf_fuse import fuse_layers

from .conftest import BACKEND_PATHS, on_path
from .hf_models import batch, lora_peft, tiny_model

U = 2.0 ** -24
IDS = [b if i is None else f"{b}-{i}" for b, i in BACKEND_PATHS]
# (batch, query heads, key/value heads, positions, head size): one position, odd sizes,
# query blocks of 64 rows and a partial one, grouped queries, heads wider than a vector
SHAPES = [(1, 1, 1, 1, 1), (1, 1, 1, 7, 8), (2, 4, 2, 7, 13), (1, 3, 1, 65, 64), (2, 2, 2, 130, 80),
          (1, 2, 1, 257, 16)]


def _inputs(B, H, Hk, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as transformers passes it: a [B, H, S, D] view of a [B, S, H, D] projection output
    q = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, Hk, S, D, generator=g)
    v = torch.randn(B, Hk, S, D, generator=g)
    do = torch.randn(B, H, S, D, generator=g)
    return q, k, v, do


def _padding_mask(lengths, S):
    """transformers' sdpa mask of a right-padded causal batch: [B, 1, S, S], True = attend."""
    pos = torch.arange(S)
    return ((pos[:, None] >= pos[None, :]) & (pos < lengths[:, None, None]))[:, None]


def _sdpa(q, k, v, do, dtype, lengths=None):
    ts = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if lengths is None:
        o = F.scaled_dot_product_attention(*ts, is_causal=True, enable_gqa=True)
    else:
        o = F.scaled_dot_product_attention(*ts, attn_mask=_padding_mask(lengths, q.shape[2]), enable_gqa=True)
    return (o, *torch.autograd.grad(o, ts, do.to(dtype)))


def _runs_per_thread_count(q, k, v, do, **kw):
    """(out, dq, dk, dv) of causal_attention at 1, 2 and 3 threads."""
    runs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
            o = qk.causal_attention(qs, ks, vs, **kw)
            runs.append((o, *torch.autograd.grad(o, (qs, ks, vs), do)))
    finally:
        torch.set_num_threads(before)
    return runs


def _check(ours, q, k, v, do, lengths=None):
    exact = _sdpa(q, k, v, do, torch.float64, lengths)
    torch32 = _sdpa(q, k, v, do, torch.float32, lengths)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), ours, exact, torch32):
        assert a.shape == e.shape, name
        err = (a.double() - e).abs().max().item()
        bound = 4 * (t.double() - e).abs().max().item() + 64 * U * e.abs().max().item() + 1e-30
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("path", BACKEND_PATHS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_against_sdpa(path, shape):
    q, k, v, do = _inputs(*shape)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with on_path(*path):
        o = qk.causal_attention(qs, ks, vs)
        grads = torch.autograd.grad(o, (qs, ks, vs), do)
    _check((o, *grads), q, k, v, do)


# (shape, key lengths): one key, the whole sequence, ends inside and at the edge of a query
# block (64 rows at these sizes), grouped queries
PADDED = [((1, 1, 1, 1, 1), [1]), ((3, 2, 1, 7, 8), [1, 7, 4]), ((2, 3, 1, 65, 64), [64, 65]),
          ((2, 2, 2, 130, 80), [129, 33]), ((4, 4, 2, 9, 13), [9, 2, 5, 8])]


@pytest.mark.parametrize("path", BACKEND_PATHS, ids=IDS)
@pytest.mark.parametrize("case", range(len(PADDED)), ids=lambda i: "x".join(map(str, PADDED[i][0])))
def test_right_padding_against_sdpa_with_the_mask(path, case):
    """key_lengths: batch row b sees only its first key_lengths[b] keys, as sdpa with the
    padding mask transformers builds; padded queries included (they see the valid keys), and
    the keys past a length get zero gradients."""
    shape, lengths = PADDED[case]
    lengths = torch.tensor(lengths)
    q, k, v, do = _inputs(*shape, seed=case)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with on_path(*path):
        o = qk.causal_attention(qs, ks, vs, key_lengths=lengths)
        grads = torch.autograd.grad(o, (qs, ks, vs), do)
    _check((o, *grads), q, k, v, do, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert not grads[1][b, :, n:].any() and not grads[2][b, :, n:].any()


def test_right_padding_long_rows_threads_and_dtypes():
    """1100 positions (query blocks of 59 rows, lengths inside and on block edges): within the
    bound of sdpa with the mask; the same bits for 1, 2, 3 threads; int32 lengths as int64;
    bf16 inputs widened and the output rounded once."""
    q, k, v, do = _inputs(4, 2, 1, 1100, 8, seed=11)
    lengths = torch.tensor([1100, 700, 59, 60])
    runs = _runs_per_thread_count(q, k, v, do, key_lengths=lengths)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    _check(runs[0], q, k, v, do, lengths)
    assert torch.equal(qk.causal_attention(q, k, v, key_lengths=lengths.int()), runs[0][0])
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ob = qk.causal_attention(qb, kb, vb, key_lengths=lengths)
    assert ob.dtype == torch.bfloat16
    assert torch.equal(ob, qk.causal_attention(qb.float(), kb.float(), vb.float(), key_lengths=lengths).bfloat16())


def test_full_lengths_give_the_unpadded_bits():
    q, k, v, _ = _inputs(2, 4, 2, 70, 16)
    assert torch.equal(qk.causal_attention(q, k, v, key_lengths=torch.tensor([70, 70])), qk.causal_attention(q, k, v))


@pytest.mark.parametrize("lengths,match", [
    (torch.tensor([3]), "key_lengths has 1 entries, q a batch of 2"),
    (torch.tensor([0, 3]), r"key_lengths must lie in \[1, 6\]"),
    (torch.tensor([3, 7]), r"key_lengths must lie in \[1, 6\]"),
    (torch.tensor([3.0, 2.0]), "key_lengths must be"),
    (torch.tensor([[3, 2]]), "key_lengths must be 1-D"),
])
def test_bad_key_lengths_are_refused(lengths, match):
    q, k, v, _ = _inputs(2, 4, 2, 6, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        qk.causal_attention(q, k, v, key_lengths=lengths)


def test_native_side_checks_key_lengths():
    q, k, v, _ = _inputs(2, 2, 1, 8, 4)
    q = q.contiguous()
    out, lse = torch.empty(2, 8, 2, 4), torch.empty(2, 2, 8)

    def view(t):
        return (t.data_ptr(), t.numel(), t.stride(0), t.stride(1), t.stride(2))

    for lens, match in ((torch.tensor([8]), "key_lengths has 1 elements"), (torch.tensor([8, 9]), r"key_lengths\[1\] = 9")):
        with pytest.raises(ValueError, match=match):
            _C.attention_forward(view(q), view(k), view(v), 2, 2, 1, 8, 4, 0.5, view(out.transpose(1, 2)),
                                 lse.data_ptr(), lse.numel(), lens.data_ptr(), lens.numel(), 1)


@pytest.mark.parametrize("path", [p for p in BACKEND_PATHS if p[0] == "cpu"], ids=lambda p: p[1])
def test_long_sequence(path):
    """4097 positions: 16-row query blocks, scores 4097 wide (not a whole vector)."""
    q, k, v, do = _inputs(1, 2, 1, 4097, 4, seed=3)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with on_path(*path):
        o = qk.causal_attention(qs, ks, vs, 0.7)
        grads = torch.autograd.grad(o, (qs, ks, vs), do)
    ts = [t.detach().double().requires_grad_() for t in (q, k, v)]
    e = F.scaled_dot_product_attention(*ts, is_causal=True, enable_gqa=True, scale=0.7)
    exact = (e, *torch.autograd.grad(e, ts, do.double()))
    for name, a, x in zip(("out", "dq", "dk", "dv"), (o, *grads), exact):
        err = (a.double() - x).abs().max().item()
        assert err <= 1e-4 * x.abs().max().item(), name


def test_same_bits_for_any_thread_count():
    """Every output element is summed by one thread in a fixed order."""
    q, k, v, do = _inputs(2, 4, 2, 130, 64)
    runs = _runs_per_thread_count(q, k, v, do)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_half_precision_inputs_widen_and_round_once():
    q, k, v, _ = _inputs(1, 2, 2, 9, 16)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    o = qk.causal_attention(qb, kb, vb)
    assert o.dtype == torch.bfloat16
    assert torch.equal(o, qk.causal_attention(qb.float(), kb.float(), vb.float()).bfloat16())


@pytest.mark.parametrize("args,match", [
    (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
    (lambda q, k, v: (q, k, v[..., :3]), "k has shape .* v has"),
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), "positions"),
    (lambda q, k, v: (q[:, :3], k, v), "multiple of key/value heads"),
    (lambda q, k, v: (q, k.int(), v), "k must be"),
    (lambda q, k, v: (q, k, v, -1.0), "scale must be finite and > 0"),
    (lambda q, k, v: (q, k, v, float("nan")), "scale must be finite and > 0"),
    (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), "every dimension must be >= 1"),
])
def test_bad_input_names_the_argument(args, match):
    q, k, v, _ = _inputs(1, 4, 2, 6, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        qk.causal_attention(*args(q, k, v))


def test_native_side_checks_every_index():
    """The binding refuses a view whose strides reach past the memory it was given."""
    q, k, v, _ = _inputs(1, 2, 1, 8, 4)
    out = torch.empty(1, 8, 2, 4)
    lse = torch.empty(1, 2, 8)

    def view(t, span=None):
        return (t.data_ptr(), t.numel() if span is None else span, t.stride(0), t.stride(1), t.stride(2))

    q = q.contiguous()
    with pytest.raises(ValueError, match="k: its strides reach element"):
        _C.attention_forward(view(q), view(k, k.numel() - 1), view(v), 1, 2, 1, 8, 4, 0.5,
                             view(out.transpose(1, 2), out.numel()), lse.data_ptr(), lse.numel(), 0, 0, 1)
    with pytest.raises(ValueError, match="lse has"):
        _C.attention_forward(view(q), view(k), view(v), 1, 2, 1, 8, 4, 0.5, view(out.transpose(1, 2), out.numel()),
                             lse.data_ptr(), lse.numel() - 1, 0, 0, 1)
    with pytest.raises(ValueError, match="multiple"):
        _C.attention_forward(view(q), view(k), view(v), 1, 3, 2, 8, 4, 0.5, view(out.transpose(1, 2), out.numel()),
                             lse.data_ptr(), lse.numel(), 0, 0, 1)


def test_native_side_refuses_overflow_and_overlap():
    """Strides whose products wrap int64, shapes whose element counts do, outputs over an input
    or over themselves: each refused before a kernel runs (they crashed or raced)."""
    q = torch.randn(1, 2, 64, 16)
    k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    out, lse = torch.empty(1, 64, 2, 16), torch.empty(1, 2, 64)

    def view(t, span=None):
        return (t.data_ptr(), t.numel() if span is None else span, t.stride(0), t.stride(1), t.stride(2))

    def fwd(qv, kv, vv, ov, B=1, H=2, Hk=2, S=64, D=16, lse_numel=lse.numel()):
        _C.attention_forward(qv, kv, vv, B, H, Hk, S, D, 0.25, ov, lse.data_ptr(), lse_numel, 0, 0, 2)

    o = view(out.transpose(1, 2))
    fwd(view(q), view(k), view(v), o)  # the well-formed call
    x = q[0, 0, 0]
    with pytest.raises(ValueError, match="q is too large"):  # 2 * stride wraps negative
        big = (x.data_ptr(), x.numel(), 2 ** 62 + 2 ** 40, 0, 0)
        fwd(big, big, big, (out.data_ptr(), out.numel(), 8, 8, 8), B=3, H=1, Hk=1, S=1, D=8, lse_numel=3)
    with pytest.raises(ValueError, match="too large"):  # B*H*S = 2^64
        z = (x.data_ptr(), 1, 0, 0, 0)
        fwd(z, z, z, z, B=2 ** 24, H=2 ** 16, Hk=2 ** 16, S=2 ** 24, D=1, lse_numel=0)
    with pytest.raises(ValueError, match="out overlaps q"):
        fwd(view(q), view(k), view(v), view(q.view(1, 64, 2, 16).transpose(1, 2)))
    with pytest.raises(ValueError, match="out: its elements overlap"):
        fwd(view(q), view(k), view(v), (out.data_ptr(), 16, 0, 0, 0))
    with pytest.raises(ValueError, match="lse overlaps"):
        _C.attention_forward(view(q), view(k), view(v), 1, 2, 2, 64, 16, 0.25, o, k.data_ptr(), lse.numel(), 0, 0, 1)
    dout = torch.randn(1, 64, 2, 16)
    dq, dk = torch.empty(1, 2, 64, 16), torch.empty(1, 2, 64, 16)

    def bwd(dqv, dkv, dvv):
        _C.attention_backward(view(dout.transpose(1, 2)), view(q), view(k), view(v), o, lse.data_ptr(),
                              lse.numel(), 1, 2, 2, 64, 16, 0.25, dqv, dkv, dvv, 0, 0, 1)
    with pytest.raises(ValueError, match="dk overlaps dv"):
        bwd(view(dq), view(dk), view(dk))
    with pytest.raises(ValueError, match="dq overlaps k"):
        bwd(view(k), view(dq), view(dk))


def test_default_scale_under_dynamic_compile():
    """The default scale (head size ** -0.5) is a SymFloat under dynamic shapes: the checks trace it."""
    q, k, v, _ = _inputs(1, 2, 1, 9, 8)
    compiled = torch.compile(lambda *a: qk.causal_attention(*a), fullgraph=True, dynamic=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), qk.causal_attention(q, k, v))


# ------------------------------------------------------------- transformers ----

def _peft(arch: str, attention: bool):
    model = qk.quantize_model(tiny_model(arch), fuse_loss=True)
    fuse_layers(model, attention=attention)
    return lora_peft(model, arch)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_model_step_matches_sdpa(arch):
    fused, plain = _peft(arch, True), _peft(arch, False)
    assert fused.get_base_model().config._attn_implementation == "qlora_kernels"
    assert plain.get_base_model().config._attn_implementation == "sdpa"
    hf_attention.reset_counts()
    results = []
    for pm in (fused, plain):
        out = pm(**batch())
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}))
    assert hf_attention.fallbacks() == {"fused": fused.get_base_model().config.num_hidden_layers}
    (lf, gf), (lp, gp) = results
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    assert gf.keys() == gp.keys() and gf
    for n in gf:
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-4, atol=1e-6, msg=n)


def test_padding_cache_and_dropout_fall_back_to_sdpa():
    fused, plain = _peft("llama", True), _peft("llama", False)
    for m in (fused, plain):
        m.eval()
    b = batch()
    mask = torch.ones_like(b["input_ids"])
    mask[0, :5] = 0
    hf_attention.reset_counts()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=b["input_ids"], attention_mask=mask).logits,
                                   plain(input_ids=b["input_ids"], attention_mask=mask).logits, rtol=1e-4, atol=1e-5)
        kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        ids = b["input_ids"][:1, :6]
        assert torch.equal(fused.generate(input_ids=ids, **kw), plain.generate(input_ids=ids, **kw))
    counts = hf_attention.fallbacks()
    assert counts["an attention mask other than right padding"] >= 2
    assert counts["queries and keys differ in number (a KV cache)"] >= 3
    assert counts.get("fused", 0) >= 2  # the prompt of generate
    inner = fused.get_base_model()
    for m in inner.modules():
        if hasattr(m, "attention_dropout"):  # read by each attention layer's forward
            m.attention_dropout = 0.1
    fused.train()
    hf_attention.reset_counts()
    fused(**batch())
    assert hf_attention.fallbacks() == {"attention dropout": inner.config.num_hidden_layers}


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_right_padded_batch_is_fused_and_matches_sdpa(arch):
    """What training collators write (sequences padded at the end, masked): the kernel takes
    every layer, and the loss, the gradients and every position's logits equal sdpa's."""
    fused, plain = _peft(arch, True), _peft(arch, False)
    b = batch()
    mask = torch.ones_like(b["input_ids"])
    mask[1, 11:] = 0
    labels = b["labels"].masked_fill(mask == 0, -100)
    hf_attention.reset_counts()
    results = []
    for pm in (fused, plain):
        out = pm(input_ids=b["input_ids"], attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}))
    assert hf_attention.fallbacks() == {"fused (right padding)": fused.get_base_model().config.num_hidden_layers}
    (lf, gf), (lp, gp) = results
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    for n in gf:
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-4, atol=1e-6, msg=n)
    fused.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused.get_base_model().model(input_ids=b["input_ids"], attention_mask=mask)[0],
                                   plain.get_base_model().model(input_ids=b["input_ids"], attention_mask=mask)[0],
                                   rtol=1e-4, atol=1e-5)


def test_only_the_right_padding_pattern_is_taken():
    """The mask is compared with the pattern in full: a hole in it, a fully padded row, a
    float mask or a broadcast batch run sdpa; the analysis of one mask is reused across layers."""
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v, _ = _inputs(2, 2, 1, 6, 8)
    good = _padding_mask(torch.tensor([6, 4]), 6)
    hole = good.clone()
    hole[1, 0, 5, 2] = False
    empty = _padding_mask(torch.tensor([6, 0]), 6)
    hf_attention.reset_counts()
    for mask in (good, good, hole, empty, good.float(), good[:1]):
        out, _ = hf_attention.attention_forward(module, q, k, v, mask)
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                             attn_mask=mask).transpose(1, 2)
        if mask is not empty:  # sdpa's output for a row that sees no key is not defined
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert hf_attention.fallbacks() == {"fused (right padding)": 2, "an attention mask other than right padding": 4}


def test_mask_analysis_cache_follows_edits_and_inference_tensors():
    """The analysis of a mask is reused for the same tensor at the same version only: an
    in-place edit is seen; inference-mode masks (no version counter) are compared each time;
    an expanded (stride-0) mask is read correctly."""
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v, _ = _inputs(2, 2, 1, 6, 8)
    mask = _padding_mask(torch.tensor([6, 4]), 6)
    hf_attention.reset_counts()
    hf_attention.attention_forward(module, q, k, v, mask)
    mask[1, 0, 5, 2] = False  # a hole now: the cached verdict must not be reused
    hf_attention.attention_forward(module, q, k, v, mask)
    assert hf_attention.fallbacks() == {"fused (right padding)": 1, "an attention mask other than right padding": 1}
    hf_attention.reset_counts()
    with torch.inference_mode():
        for lengths in ([6, 4], [6, 4], [2, 6]):
            m = _padding_mask(torch.tensor(lengths), 6)
            out, _ = hf_attention.attention_forward(module, q, k, v, m)
            ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=m)
            torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
        left = _padding_mask(torch.tensor([6, 6]), 6).clone()
        left[1, 0, :, :2] = False  # left padding
        hf_attention.attention_forward(module, q, k, v, left)
    assert hf_attention.fallbacks() == {"fused (right padding)": 3, "an attention mask other than right padding": 1}
    hf_attention.reset_counts()
    expanded = _padding_mask(torch.tensor([5]), 6).expand(2, 1, 6, 6)
    out, _ = hf_attention.attention_forward(module, q, k, v, expanded)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=expanded)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
    assert hf_attention.fallbacks() == {"fused (right padding)": 1}


def test_key_lengths_under_fake_tensors_and_compile():
    """The op's checks read key_lengths' values only from a plain tensor: fake tensors (shape
    propagation) and a fullgraph compile take it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, _ = _inputs(2, 4, 2, 9, 8)
    lengths = torch.tensor([9, 4])
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv, fl = (mode.from_tensor(t) for t in (q, k, v, lengths))
        assert qk.causal_attention(fq, fk, fv, key_lengths=fl).shape == (2, 4, 9, 8)
    compiled = torch.compile(lambda *a: qk.causal_attention(*a, key_lengths=lengths), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), qk.causal_attention(q, k, v, key_lengths=lengths))


def test_unfuse_and_models_left_alone():
    model = tiny_model("llama")
    assert hf_attention.fuse_attention(torch.nn.Linear(2, 2)) == "no transformers model inside"
    model.set_attn_implementation("eager")
    twin = copy.deepcopy(model)
    assert hf_attention.fuse_attention(model) is None
    assert model.config._attn_implementation == "qlora_kernels"
    assert twin.config._attn_implementation == "eager"  # its own config
    hf_attention.unfuse_attention(model)
    assert model.config._attn_implementation == "eager"  # what it had
    model.config._attn_implementation = "flex_attention"
    assert "flex_attention" in hf_attention.fuse_attention(model)


def test_fused_model_compiles_fullgraph():
    """The fallback counter stays out of the traced graph (dynamo cannot trace its lock)."""
    model = tiny_model("llama")
    ids = batch()["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        assert hf_attention.fuse_attention(model) is None
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_batch_broadcast_falls_back():
    """sdpa broadcasts a batch-1 query over the keys' batch; the kernel does not: sdpa runs it."""
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    hf_attention.reset_counts()
    out, _ = hf_attention.attention_forward(module, q, k, v, None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2))
    assert hf_attention.fallbacks() == {"head counts or sizes the kernel does not pair": 1}


def _tiny(config_cls, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config_cls(**{**common, **kw}), dtype=torch.float32).eval()


def test_models_whose_results_depend_on_the_name_sdpa_are_left_alone():
    """transformers code that only 'sdpa' (or 'eager') gets right under another name: models
    without sdpa (their fallback), Gemma 4's KV-shared layers slicing queries with no mask
    (wrong logits with logits_to_keep > 1), sparse attention folding its selection into the
    mask only for 'eager'/'sdpa' (dense attention otherwise)."""
    from transformers import Gemma2Config, GptOssConfig
    from transformers.models.deepseek_v32.configuration_deepseek_v32 import DeepseekV32Config
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    gemma2 = _tiny(Gemma2Config, head_dim=16, sliding_window=64)
    gpt_oss = _tiny(GptOssConfig, intermediate_size=64, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=64, layer_types=["full_attention"] * 2)
    gemma4 = _tiny(Gemma4TextConfig, num_hidden_layers=4, head_dim=16, sliding_window=64,
                   layer_types=["full_attention"] * 4, num_kv_shared_layers=2, vocab_size_per_layer_input=128,
                   hidden_size_per_layer_input=16)
    dsa = _tiny(DeepseekV32Config, moe_intermediate_size=32, num_key_value_heads=4, n_routed_experts=4, n_group=1,
                topk_group=1, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                v_head_dim=16, qk_nope_head_dim=16, head_dim=8, index_topk=4, index_head_dim=16, index_n_heads=2,
                first_k_dense_replace=2)
    for model, why in ((gemma2, "does not support sdpa"), (gpt_oss, "does not support sdpa"),
                       (gemma4, "KV-shared layers"), (dsa, "sparse attention")):
        impl = model.config._attn_implementation
        assert why in hf_attention.fuse_attention(model)
        assert model.config._attn_implementation == impl
    # and forced onto the kernels, the sparse selection is refused rather than dropped
    hf_attention.register()
    dsa.set_attn_implementation(hf_attention.NAME)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="indices"):
        dsa(input_ids=batch()["input_ids"], use_cache=False)


@pytest.mark.parametrize("lengths", [None, torch.tensor([5, 2])], ids=["causal", "right-padded"])
def test_opcheck(lengths):
    """Schemas, fake (meta) implementations and autograd registration agree with the kernels."""
    q, k, v, do = _inputs(2, 4, 2, 5, 8)
    q, k, v = (t.contiguous().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.qlora_kernels.causal_attention, (q, k, v, 0.3, lengths))
    out, lse = torch.ops.qlora_kernels.causal_attention(q, k, v, 0.3, lengths)
    torch.library.opcheck(torch.ops.qlora_kernels.causal_attention_backward,
                          (torch.randn(2, 5, 4, 8), q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.3, lengths))


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_attention_weights_asked_for_come_from_the_models_eager_attention(arch):
    """sdpa returns no weights: an 'eager' model fused here answered output_attentions=True
    with none (an empty tuple in generate), silently. Those calls run the model's own eager
    attention, on the mask this implementation gets (sdpa's boolean one, or none)."""
    from transformers import AutoModelForCausalLM

    from .hf_models import tiny_config

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32, attn_implementation="eager").eval()
    fused = copy.deepcopy(ref)
    assert hf_attention.fuse_attention(fused) is None
    ids = batch()["input_ids"][:, :9]
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask_left = torch.ones_like(ids)
    mask_left[0, :3] = 0
    with torch.no_grad():
        for m in (None, mask, mask_left):
            a = ref(ids, attention_mask=m, output_attentions=True)
            b = fused(ids, attention_mask=m, output_attentions=True)
            assert len(b.attentions) == len(a.attentions) == ref.config.num_hidden_layers
            for x, y in zip(a.attentions, b.attentions):
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
            keep = (m if m is not None else torch.ones_like(ids)).bool()
            torch.testing.assert_close(b.logits[keep], a.logits[keep], rtol=1e-4, atol=1e-5)
        kw = dict(max_new_tokens=2, do_sample=False, output_attentions=True, return_dict_in_generate=True,
                  pad_token_id=0)
        g1, g2 = ref.generate(ids[:1], **kw), fused.generate(ids[:1], **kw)
    assert [len(s) for s in g2.attentions] == [len(s) for s in g1.attentions]
    for s1, s2 in zip(g1.attentions, g2.attentions):
        for x, y in zip(s1, s2):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


def test_attention_weights_of_non_causal_attention_see_every_key():
    """The eager fallback for output_attentions built a causal mask wherever sdpa would get
    none, also for attention that is not causal: a BERT encoder's weights were lower-
    triangular and its outputs 0.027 off, a Whisper decoder's cross-attention lost the last
    encoder frames."""
    from transformers import BertConfig, BertModel, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    bert = BertModel._from_config(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=64),
                                  attn_implementation="eager").eval()
    wcfg = WhisperConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                         max_source_positions=8, max_target_positions=16, pad_token_id=0, decoder_start_token_id=1)
    whisper = WhisperForConditionalGeneration._from_config(wcfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 100, (2, 6))
    feats = torch.randn(1, 8, 16)
    dec = torch.tensor([[1, 5, 7]])
    for ref, call in ((bert, lambda m: m(ids, output_attentions=True)),
                      (whisper, lambda m: m(input_features=feats, decoder_input_ids=dec, output_attentions=True))):
        fused = copy.deepcopy(ref)
        hf_attention.fuse_attention(fused)
        with torch.no_grad():
            a, b = call(ref), call(fused)
        for name in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions"):
            ours, theirs = getattr(b, name, None), getattr(a, name, None)
            if theirs is None:
                continue
            assert ours is not None and len(ours) == len(theirs), name
            for x, y in zip(theirs, ours):
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
        out = "last_hidden_state" if hasattr(a, "last_hidden_state") else "logits"
        torch.testing.assert_close(getattr(b, out), getattr(a, out), rtol=1e-5, atol=1e-6)
