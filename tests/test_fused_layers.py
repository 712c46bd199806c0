"""The fused RMSNorm and SwiGLU (ops/norm_act.py, csrc/norm_act_*) on every path this CPU
runs, against torch's own ops in fp64 within stated bounds (u = 2^-24):

* rms_norm: |y - y64| <= (K/2 + 8) u |y64| (the fp32 sum of K squares, then ~8 roundings);
  dx within (2K + 16) u of the magnitude of its terms, dweight within (M + K/2 + 8) u of
  the sum of |dy x rstd|.
* swiglu: |h - h64| <= 8 u |h64| (the exp's 1.01 ulp, 1 + e, the divide, the product);
  dgate within 16 u (1 + |g|) |dh up| sigmoid(g) (torch's formula rounds 1 - sigmoid(g)
  near g >> 0 the same way), dup within 8 u.

Then the integration: tiny random Llama and Phi-3 models, fused vs unfused under PEFT LoRA
on our 4-bit layers: the same loss and gradients, the same state-dict keys."""
import copy

import pytest
import torch
import torch.nn.functional as F

import qlora_kernels as qk
from qlora_kernels import _C
from qlora_kernels.backends import kernel_for
from qlora_kernels.integrations.hf_fuse import fuse_layers, is_fused_mlp
from qlora_kernels.nn import RMSNorm

from .conftest import BACKEND_PATHS, on_path
from .hf_models import TARGETS, batch, lora_peft, tiny_model

U = 2.0 ** -24
IDS = [b if i is None else f"{b}-{i}" for b, i in BACKEND_PATHS]


def _torch_rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("path", BACKEND_PATHS, ids=IDS)
@pytest.mark.parametrize("M,K", [(0, 5), (1, 1), (3, 7), (513, 64), (3, 4097), (1, 4097)])
def test_rms_norm_forward_backward(path, M, K):
    g = torch.Generator().manual_seed(M * 10007 + K)
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4).requires_grad_()
    w = torch.randn(K, generator=g).requires_grad_()
    dy = torch.randn(M, K, generator=g)
    eps = 1e-5
    with on_path(*path):
        y = qk.rms_norm(x, w, eps)
        y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = _torch_rms(x64, w64, eps)
    y64.backward(dy.double())
    assert torch.all((y.double() - y64).abs() <= (K / 2 + 8) * U * y64.abs() + 1e-37), "y"
    r = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps).detach()
    dyw = (dy.double() * w64).abs().detach()
    xa = x64.detach().abs()
    mag_dx = r * dyw + xa * r ** 3 / K * (dyw * xa).sum(-1, keepdim=True)
    assert torch.all((x.grad.double() - x64.grad).abs() <= (2 * K + 16) * U * mag_dx + 1e-37), "dx"
    mag_dw = (dy.double().abs() * xa * r).sum(0)
    assert torch.all((w.grad.double() - w64.grad).abs() <= (M + K / 2 + 8) * U * mag_dw + 1e-37), "dweight"
    # the bound is not looser than torch's own fp32 ops need: transformers' math meets it too
    yt = _torch_rms(x.detach(), w.detach(), eps)
    assert torch.all((yt.double() - y64).abs() <= (K / 2 + 8) * U * y64.abs() + 1e-37)


@pytest.mark.parametrize("path", BACKEND_PATHS, ids=IDS)
@pytest.mark.parametrize("M,N", [(0, 5), (1, 1), (3, 7), (513, 64), (3, 4097)])
def test_swiglu_forward_backward(path, M, N):
    g0 = torch.Generator().manual_seed(M * 7919 + N)
    gate = (torch.randn(M, N, generator=g0) * 6).requires_grad_()
    up = torch.randn(M, N, generator=g0).requires_grad_()
    dh = torch.randn(M, N, generator=g0)
    with on_path(*path):
        h = qk.swiglu(gate, up)
        h.backward(dh)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    h64 = F.silu(g64) * u64
    h64.backward(dh.double())
    assert torch.all((h.double() - h64).abs() <= 8 * U * h64.abs() + 1e-37), "h"
    s = torch.sigmoid(g64.detach())
    mag = (dh.double() * u64.detach()).abs() * s * (1 + g64.detach().abs())
    assert torch.all((gate.grad.double() - g64.grad).abs() <= 16 * U * mag + 1e-37), "dgate"
    assert torch.all((up.grad.double() - u64.grad).abs() <= 8 * U * u64.grad.abs() + 1e-37), "dup"


def test_native_swiglu_is_the_same_on_every_path():
    """The same operations in the same order, no FMA: every ISA path gives the same bits,
    forward and backward (also for Phi-3's halves of one tensor, rows 2N apart)."""
    g = torch.Generator().manual_seed(3)
    gu = torch.randn(5, 2 * 1037, generator=g) * 10
    gate, up = gu.chunk(2, -1)
    dh = torch.randn(5, 1037, generator=g)
    outs = {}
    for isa in _C.supported_isas():
        with on_path("cpu", isa):
            outs[isa] = (qk.swiglu(gate, up), *torch.ops.qlora_kernels.swiglu_backward(dh, gate, up))
    first = outs[_C.supported_isas()[0]]
    for isa, out in outs.items():
        for a, b in zip(first, out):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), isa


def test_dweight_is_deterministic_for_a_thread_count():
    x, dy = torch.randn(517, 300), torch.randn(517, 300)
    w = torch.randn(300)
    rstd = torch.ops.qlora_kernels.rms_norm(x, w, 1e-6)[1]
    runs = [torch.ops.qlora_kernels.rms_norm_backward(dy, x, w, rstd, True)[1] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_exp_ulps():
    """The SwiGLU's exp (csrc/norm_act_common.h) within 1.01 ulp of fp64 exp over a sweep of
    fp32 bit patterns and densely over [-1, 1], the same bits on every path; 0 / inf /
    NaN where exp is."""
    pats = torch.arange(0, 2 ** 32, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([pats[(pats > -104) & (pats < 89)], torch.linspace(-1, 1, 200001)])
    ref = torch.exp(x.double())
    r32 = ref.float()
    normal = torch.isfinite(r32) & (r32 >= torch.finfo(torch.float32).tiny)
    spacing = (torch.nextafter(r32, torch.tensor(float("inf"))) - r32).double()
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 89.0, 88.73, -104.0, -200.0, 0.0, -0.0])
    results = []
    for isa in _C.supported_isas():
        with on_path("cpu", isa):
            y = torch.empty_like(x)
            _C.exp_f32(x.data_ptr(), x.numel(), y.data_ptr(), y.numel())
            ys = torch.empty_like(special)
            _C.exp_f32(special.data_ptr(), special.numel(), ys.data_ptr(), ys.numel())
        ulps = ((y.double() - ref).abs() / spacing)[normal]
        assert ulps.max() <= 1.01, (isa, float(ulps.max()))
        assert bool((y[~normal] >= 0).all())
        torch.testing.assert_close(ys, torch.exp(special), equal_nan=True, rtol=0, atol=0)
        results.append(y)
    assert all(torch.equal(results[0].view(torch.int32), r.view(torch.int32)) for r in results)


@pytest.mark.parametrize("path", BACKEND_PATHS, ids=IDS)
def test_nan_and_inf_propagate_as_in_torch(path):
    x = torch.randn(4, 33)
    x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    w = torch.randn(33)
    gate = torch.randn(4, 33)
    gate[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -1e4])
    up = torch.randn(4, 33)
    up[3, 3] = float("inf")
    dh = torch.randn(4, 33)
    with on_path(*path):
        y = qk.rms_norm(x, w, 1e-6)
        h = qk.swiglu(gate, up)
        dg, du = torch.ops.qlora_kernels.swiglu_backward(dh, gate, up)
    torch.testing.assert_close(y, _torch_rms(x, w, 1e-6), equal_nan=True)
    torch.testing.assert_close(h, F.silu(gate) * up, equal_nan=True)
    gt, ut = gate.clone().requires_grad_(), up.clone().requires_grad_()
    (F.silu(gt) * ut).backward(dh)
    assert torch.equal(dg.isnan(), gt.grad.isnan()) and torch.equal(du.isnan(), ut.grad.isnan())
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 3]]).all()


def test_bf16_is_widened_and_rounded_once():
    x, w = torch.randn(3, 40, dtype=torch.bfloat16), torch.randn(40, dtype=torch.bfloat16)
    y = qk.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, _torch_rms(x.float(), w.float(), 1e-6).bfloat16(), rtol=0, atol=0)
    g, u = torch.randn(3, 40, dtype=torch.float16), torch.randn(3, 40, dtype=torch.float16)
    h = qk.swiglu(g, u)
    assert h.dtype == torch.float16
    torch.testing.assert_close(h, (F.silu(g.float()) * u.float()).half())


@pytest.mark.parametrize("call,match", [
    (lambda: qk.rms_norm(torch.randn(2, 4).long(), torch.randn(4)), "x must be"),
    (lambda: qk.rms_norm(torch.randn(2, 4), torch.randn(5)), "weight has shape"),
    (lambda: qk.rms_norm(torch.randn(2, 4), torch.randn(4, 1)), "weight must be 1-D"),
    (lambda: qk.rms_norm(torch.randn(2, 4), torch.randn(4), -1.0), "eps must be"),
    (lambda: qk.rms_norm(torch.randn(2, 4), torch.randn(4, device="meta")), "weight is on meta"),
    (lambda: qk.rms_norm(torch.randn(2, 0), torch.randn(0)), "weight is empty"),
    (lambda: qk.swiglu(torch.randn(2, 4), torch.randn(2, 5)), "up has shape"),
    (lambda: qk.swiglu(torch.randn(2, 4).double(), torch.randn(2, 4)), "gate must be"),
    (lambda: qk.swiglu(torch.randn(2, 4), "up"), "up must be a torch.Tensor"),
    (lambda: torch.ops.qlora_kernels.swiglu_backward(torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)),
     "dh has shape"),
    (lambda: torch.ops.qlora_kernels.rms_norm_backward(torch.randn(2, 4), torch.randn(2, 4), torch.randn(4),
                                                       torch.randn(3), True), "rstd has shape"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_binding_checks_sizes():
    x, w, y, r = torch.randn(2, 4), torch.randn(4), torch.empty(2, 4), torch.empty(2)
    with pytest.raises(ValueError, match="weight has 3 elements"):
        _C.rms_norm_forward(x.data_ptr(), 8, 2, 4, w.data_ptr(), 3, 1e-6, y.data_ptr(), 8, r.data_ptr(), 2, 1)
    with pytest.raises(ValueError, match="row stride"):
        _C.swiglu_forward(x.data_ptr(), 8, 3, x.data_ptr(), 8, 4, 2, 4, y.data_ptr(), 8, 1)
    # rows that reach past what the operand holds (a strided view's storage)
    with pytest.raises(ValueError, match="up: 2 rows of 4 at stride 6 reach past the 8 elements"):
        _C.swiglu_forward(x.data_ptr(), 8, 4, x.data_ptr(), 8, 6, 2, 4, y.data_ptr(), 8, 1)
    with pytest.raises(ValueError, match="gate: .* reach past"):
        _C.swiglu_backward(y.data_ptr(), 8, x.data_ptr(), 7, 4, x.data_ptr(), 8, 4, 2, 4, y.data_ptr(), 8,
                           r.data_ptr(), 8, 1)
    # shapes whose element count wraps around int64 (2^33 x 2^31 = 2^64 -> 0) are refused, not run
    with pytest.raises(ValueError, match="out of range"):
        _C.swiglu_forward(x.data_ptr(), 2**31 + 1, 2**31, x.data_ptr(), 2**31 + 1, 2**31, 2**33, 2**31,
                          y.data_ptr(), 0, 1)
    with pytest.raises(ValueError, match="out of range"):
        _C.rms_norm_forward(x.data_ptr(), 0, 2**33, 2**31, w.data_ptr(), 2**31, 1e-6, y.data_ptr(), 0,
                            r.data_ptr(), 2**33, 1)


def test_opcheck():
    x, w = torch.randn(3, 5, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    torch.library.opcheck(torch.ops.qlora_kernels.rms_norm, (x, w, 1e-6))
    _, rstd = torch.ops.qlora_kernels.rms_norm(x.detach(), w.detach(), 1e-6)
    torch.library.opcheck(torch.ops.qlora_kernels.rms_norm_backward, (torch.randn(3, 5, 16), x.detach(), w.detach(),
                                                                      rstd, True))
    g, u = torch.randn(4, 24, requires_grad=True), torch.randn(4, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.qlora_kernels.swiglu, (g, u))
    torch.library.opcheck(torch.ops.qlora_kernels.swiglu_backward, (torch.randn(4, 24), g.detach(), u.detach()))


def test_cpu_kernels_are_registered():
    for op in ("rms_norm", "rms_norm_backward", "swiglu", "swiglu_backward"):
        assert kernel_for(op, "cpu")[0] == "cpu"


# ---------------------------------------------------------------- integration ----

def _peft(arch: str, fuse: bool):
    return lora_peft(qk.quantize_model(tiny_model(arch), fuse_loss=True, fuse_norm_mlp=fuse), arch)


def _loss_and_grads(pm):
    out = pm(**batch())
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_fused_model_matches_unfused(arch):
    fused, plain = _peft(arch, True), _peft(arch, False)
    layers = fused.get_base_model().config.num_hidden_layers
    norms = [m for m in fused.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * layers + 1
    assert sum(is_fused_mlp(m) for m in fused.modules()) == layers
    assert fused.state_dict().keys() == plain.state_dict().keys()
    # the norms train: their weights get gradients through rms_norm_backward
    for p in fused.parameters():
        p.requires_grad_(True) if p.is_floating_point() and p.dim() == 1 else None
    for p in plain.parameters():
        p.requires_grad_(True) if p.is_floating_point() and p.dim() == 1 else None
    (lf, gf), (lp, gp) = _loss_and_grads(fused), _loss_and_grads(plain)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    assert gf.keys() == gp.keys() and any("norm" in n for n in gf)
    for n in gf:
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-4, atol=1e-6, msg=n)


def test_deepcopy_eval_generate_and_fallback():
    fused, plain = _peft("llama", True), _peft("llama", False)
    twin = copy.deepcopy(fused)
    mlp = next(m for m in twin.modules() if is_fused_mlp(m))
    assert mlp.forward.args[0] is mlp  # the copy's forward is bound to the copy
    for m in (fused, plain, twin):
        m.eval()
    ids = batch()["input_ids"][:1, :4]
    kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch()).logits, plain(**batch()).logits, rtol=1e-4, atol=1e-5)
        out = [m.generate(input_ids=ids, **kw) for m in (fused, plain, twin)]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    # outside the fast case (bf16): the original math, as LlamaRMSNorm computes it
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(64, eps=1e-6)
    ours = RMSNorm(64, 1e-6, hf.weight)
    xb = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(ours(xb), hf(xb))


def test_gemma_style_norm_is_left_alone():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = torch.nn.Sequential(GemmaRMSNorm(32), LlamaRMSNorm(32))
    summary = fuse_layers(model)
    assert summary["rms_norm"] == 1 and type(model[0]) is GemmaRMSNorm and type(model[1]) is RMSNorm
    assert "Gemma" in summary["skipped"][0][1]


def test_norm_with_other_half_precision_rounding_is_left_alone():
    """A norm that agrees in fp32 but rounds differently for bf16 input (weight * normed in
    fp32, then cast) would get LlamaRMSNorm's math in the fallback: it is not replaced."""
    class OtherRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(32))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight * h).to(x.dtype)

    model = torch.nn.Sequential(OtherRMSNorm())
    summary = fuse_layers(model)
    assert summary["rms_norm"] == 0 and "bf16" in summary["skipped"][0][1]


def test_fused_model_saves_and_loads_whole():
    """torch.save of a whole fused model (the MLPs' own forward is a partial of a module-level
    function, which pickles by name) loads back fused, with the same outputs."""
    import io

    fused = _peft("llama", True).eval()
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert sum(is_fused_mlp(m) for m in back.modules()) == fused.get_base_model().config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(back(**batch()).logits, fused(**batch()).logits)


def test_mlp_with_other_modules_or_hooks_is_left_alone():
    """What an eval-mode probe cannot see is not fused: a dropout applied only in training
    (transformers' GteMLP), and hooks, which a replacement would drop (norms) or which would
    watch another computation; the probe itself fires no hooks."""
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    cfg = tiny_model("llama").config
    with_dropout = LlamaMLP(cfg)
    with_dropout.dropout = torch.nn.Dropout(0.5)
    hooked_mlp, hooked_norm, plain = LlamaMLP(cfg), LlamaRMSNorm(cfg.hidden_size), LlamaMLP(cfg)
    calls = []
    hooked_mlp.register_forward_hook(lambda *a: calls.append("mlp"))
    hooked_norm.register_forward_pre_hook(lambda *a: calls.append("norm"))
    model = torch.nn.ModuleList([with_dropout, hooked_mlp, hooked_norm, plain])
    summary = fuse_layers(model)
    assert summary["mlp"] == 1 and summary["rms_norm"] == 0 and is_fused_mlp(plain)
    assert not any(is_fused_mlp(m) for m in (with_dropout, hooked_mlp)) and type(model[2]) is LlamaRMSNorm
    reasons = dict(summary["skipped"])
    assert "dropout" in reasons["0"] and "hooks" in reasons["1"] and "hooks" in reasons["2"]
    assert calls == []


def test_mlp_with_a_dropout_or_clamp_in_its_forward_is_left_alone():
    """What no child module shows: a dropout called in forward itself in training (Seed-OSS's
    residual dropout) and a clamp of gate and up that randn-sized probes never reach
    (DeepSeek V4's swiglu_limit). Both were fused, the dropout and the clamp dropped. LoRA
    projections with dropout (PEFT's, non-zero B) draw the same masks on both sides of the
    training probe, and stay fused."""
    from peft import LoraConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from qlora_kernels.integrations.peft import get_peft_model

    class ResidualDropoutMLP(LlamaMLP):
        def forward(self, x):
            return F.dropout(super().forward(x), p=0.1, training=self.training)

    class ClampedMLP(LlamaMLP):
        def forward(self, x):
            gate, up = self.gate_proj(x).clamp(max=10.0), self.up_proj(x).clamp(-10.0, 10.0)
            return self.down_proj(self.act_fn(gate) * up)

    cfg = tiny_model("llama").config
    model = torch.nn.ModuleList([ResidualDropoutMLP(cfg), ClampedMLP(cfg), LlamaMLP(cfg)])
    summary = fuse_layers(model)
    reasons = dict(summary["skipped"])
    assert summary["mlp"] == 1 and is_fused_mlp(model[2]) and not is_fused_mlp(model[0]) and not is_fused_mlp(model[1])
    assert "in training" in reasons["0"] and "down_proj(silu(gate) * up)" in reasons["1"]
    pm = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"],
                                                        lora_dropout=0.2, init_lora_weights=False))
    pm.train()
    assert fuse_layers(pm)["mlp"] == 2


def test_empty_last_dimension():
    g, u = torch.randn(3, 0), torch.randn(3, 0)
    assert qk.swiglu(g, u).shape == (3, 0)


def test_inference_paths():
    """Without autograd the norm runs the op's implementation directly (no dispatcher: at
    decode's one row the dispatch cost more than the kernel) with the op's bits, and the
    fused MLP runs the module's own silu(gate) * up, transformers' bits; with autograd both
    take the ops."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = tiny_model("llama").config
    norm = RMSNorm(cfg.hidden_size, 1e-5, torch.nn.Parameter(torch.randn(cfg.hidden_size)))
    mlp, plain = LlamaMLP(cfg), LlamaMLP(cfg)
    plain.load_state_dict(mlp.state_dict())
    assert fuse_layers(torch.nn.ModuleList([mlp]))["mlp"] == 1
    for shape in ((1, 1, cfg.hidden_size), (3, cfg.hidden_size), (cfg.hidden_size,)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(norm(x), torch.ops.qlora_kernels.rms_norm(x, norm.weight, 1e-5)[0])
            assert torch.equal(mlp(x), plain(x))
    x = torch.randn(2, 5, cfg.hidden_size, requires_grad=True)
    y = norm(x)
    assert y.grad_fn.name() == "qlora_kernels::rms_normBackward"  # the op's eager Function (ops/eager.py)
    torch.testing.assert_close(mlp(x), plain(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["qlora", "dora", "lora"])
def test_finetune_trains_on_the_fused_layers(method):
    from qlora_kernels.finetune.model import prepare

    torch.manual_seed(0)
    pm = prepare(tiny_model("llama"), method, 4, 8, 0.0, TARGETS["llama"])
    layers = pm.get_base_model().config.num_hidden_layers
    assert sum(isinstance(m, RMSNorm) for m in pm.modules()) == 2 * layers + 1
    assert sum(is_fused_mlp(m) for m in pm.modules()) == layers
