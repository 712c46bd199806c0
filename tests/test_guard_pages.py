"""No kernel reads outside its input tensors (nor writes outside the ones it updates in
place, AdamW's), checked with guard pages, on every native path. Each input is copied so
that it ends right before (or starts right after) a page mapped PROT_NONE, as electric-fence
places allocations: one element too far faults at once,
where the sanitizer lane's redzones only see what its -O1 build does. This is the test that
caught GCC 12's -O3 loop vectorizer reading one row past a block product's input in the
scalar path (csrc/attention_simd.h, setup.py: the scalar files are built without it).

Shapes are small and awkward (not multiples of a vector, a block or a tile)."""
from __future__ import annotations

import ctypes
import mmap
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_kernels import _C
from qlora_kernels import functional as F

from .conftest import kernel_paths, on_path

PAGE = mmap.PAGESIZE
ROOT = Path(__file__).parents[1]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAPS: list[mmap.mmap] = []  # kept mapped for the process: a tensor may outlive its test


def guarded(t: torch.Tensor, where: str) -> torch.Tensor:
    """A contiguous copy of t whose bytes end at a PROT_NONE page (where="end") or begin
    right after one ("start"); requires_grad carried over."""
    src = t.detach().contiguous()
    nbytes = src.numel() * src.element_size()
    data_pages = max(1, (nbytes + PAGE - 1) // PAGE)
    mm = mmap.mmap(-1, (data_pages + 1) * PAGE)
    _MAPS.append(mm)
    raw = torch.frombuffer(mm, dtype=torch.uint8)
    base = raw.data_ptr()
    if where == "end":
        guard, first = data_pages * PAGE, data_pages * PAGE - nbytes
    else:
        guard, first = 0, PAGE
    assert _libc.mprotect(base + guard, PAGE, 0) == 0, ctypes.get_errno()
    out = raw[first:first + nbytes].view(src.dtype).view(src.shape)
    out.copy_(src)
    return out.requires_grad_(t.requires_grad)


def _grads(y, inputs, where, seed=1):
    g = torch.Generator().manual_seed(seed)
    dy = guarded(torch.randn(y.shape, generator=g).to(y.dtype), where)
    return torch.autograd.grad(y, inputs, dy)


def _randn(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _weight(N, K, blocksize=64, quant_type="nf4"):
    return F.quantize_4bit(_randn(N, K, seed=7), quant_type, blocksize)


def case_linear_4bit(where, M):
    packed, state = _weight(37, 200)
    x = guarded(_randn(M, 200, grad=True), where)
    p = guarded(packed, where)
    state.absmax = guarded(state.absmax, where)
    y = F.linear_4bit(x, p, state)
    _grads(y, [x], where)
    F.linear_4bit(x.detach(), p, state, compute="int8")


def case_double_quant_and_prepared(where, M):
    """Nested absmax decoded (dequantize_8bit), and a prepared weight's direct calls: the
    one-row int8 forward on its repacked copy among them."""
    # 13 blocks of 128 a row: a short last panel that the repacked kernels still take
    packed, state = F.quantize_4bit(_randn(40, 1664, seed=7), "nf4", 128, double_quant=True)
    state.absmax = guarded(state.absmax, where)
    state.state2.absmax = guarded(state.state2.absmax, where)
    w = F.prepare_4bit(guarded(packed, where), state)
    x = guarded(_randn(M, 1664), where)
    for compute in ("fp32", "int8"):
        F.linear_4bit(x, w, compute=compute)
        F.linear_4bit(x[:1], w, compute=compute)
    assert w.has_int8_copy() == _C.linear4_q8_repacked_fits(40, 1664, 128)
    F.dequantize_4bit(guarded(packed, where), state)


def case_lora_linear_4bit(where, M):
    packed, state = _weight(136, 72)
    x = guarded(_randn(M, 72, grad=True), where)
    A = guarded(_randn(5, 72, seed=2, grad=True), where)
    B = guarded(_randn(136, 5, seed=3, grad=True), where)
    y = F.lora_linear_4bit(x, guarded(packed, where), state, A, B, 0.5)
    _grads(y, [x, A, B], where)
    y = F.lora_linear_4bit(x, guarded(packed, where), state, A, B, 0.5, dropout_p=0.1, training=True)
    _grads(y, [x, A, B], where)


def case_lora_linear(where, M):
    x = guarded(_randn(M, 72, grad=True), where)
    W = guarded(_randn(33, 72, seed=4), where)
    A = guarded(_randn(3, 72, seed=2, grad=True), where)
    B = guarded(_randn(33, 3, seed=3, grad=True), where)
    _grads(F.lora_linear(x, W, A, B, 2.0), [x, A, B], where)


def case_quantize(where, M):
    W = guarded(_randn(M, 131), where)
    for quant_type in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(W, quant_type, 64, double_quant=True)
        F.dequantize_4bit(guarded(packed, where), state)


def case_rms_norm_swiglu(where, M):
    x = guarded(_randn(M, 77, grad=True), where)
    w = guarded(_randn(77, seed=2, grad=True), where)
    _grads(F.rms_norm(x, w), [x, w], where)
    gate = guarded(_randn(M, 77, seed=3, grad=True), where)
    up = guarded(_randn(M, 77, seed=4, grad=True), where)
    _grads(F.swiglu(gate, up), [gate, up], where)


def case_attention(where, M):
    S = M + 2
    # q as transformers passes it: a [B, H, S, D] view of a [B, S, H, D] buffer
    q = guarded(_randn(2, S, 4, 13, grad=True), where)
    k = guarded(_randn(2, 2, S, 13, seed=2, grad=True), where)
    v = guarded(_randn(2, 2, S, 13, seed=3, grad=True), where)
    lengths = guarded(torch.tensor([S, max(1, S // 2)]), where)
    for kl in (None, lengths):
        _grads(F.causal_attention(q.transpose(1, 2), k, v, key_lengths=kl), [q, k, v], where)


def case_rope(where, M):
    S = M + 2
    q = guarded(_randn(2, S, 3 * 14, grad=True), where)
    k = guarded(_randn(2, S, 14, seed=2, grad=True), where)
    for Bc in (2, 1):
        cos, sin = guarded(_randn(Bc, S, 14, seed=3), where), guarded(_randn(Bc, S, 14, seed=4), where)
        qe, ke = F.rope(q.view(2, S, 3, 14).transpose(1, 2), k.view(2, S, 1, 14).transpose(1, 2), cos, sin)
        # output gradients as autograd hands them over: [B, S, heads, D] buffers
        dq, dk = (guarded(_randn(2, S, h, 14, seed=5), where).transpose(1, 2) for h in (3, 1))
        torch.autograd.grad([qe, ke], [q, k], [dq, dk])


def case_native_decode(where, M):
    """transformers' generate with the native decode step (csrc/decode_*: one plan over every
    layer) on a model whose parameters and buffers all live at guard pages: LoRA on a 4-bit
    Llama with its own 4-bit head, and on a Phi-3 (fused qkv and gate/up projections)."""
    if M != 1:  # one run per placement: the step's shapes come from the model, not from M
        return
    from qlora_kernels.integrations import hf_decode

    from .test_native_decode import LLAMA, PROMPT, generate, random_lora, tiny

    models = [random_lora(tiny(tie=False, skip=()), LLAMA, r=4, std=0.1),
              random_lora(tiny("phi3"), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], r=4, std=0.1)]
    for m in models:
        for mod in m.modules():
            for _, p in mod.named_parameters(recurse=False):
                p.data = guarded(p.data, where)
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is not None:
                    setattr(mod, name, guarded(b, where))
        want = generate(m, PROMPT, 5)[0]
        hf_decode.enable_native_decode(m)
        assert generate(m, PROMPT, 5)[0] == want
        assert hf_decode.status(m)["steps"] == 4


def case_cross_entropy(where, M):
    x = guarded(_randn(M, 40, grad=True), where)
    W = guarded(_randn(301, 40, seed=2, grad=True), where)
    labels = torch.randint(0, 301, (M,), generator=torch.Generator().manual_seed(5))
    labels[0] = -100
    loss = F.linear_cross_entropy(x, W, guarded(labels, where))
    torch.autograd.grad(loss, [x, W])


def case_adamw(where, M):
    from qlora_kernels.optim import AdamW

    p = torch.nn.Parameter(guarded(_randn(M, 45), where))
    p.grad = guarded(_randn(M, 45, seed=2), where)
    opt = AdamW([p], lr=1e-3)
    opt.step()
    opt.step()


CASES = {f.__name__[5:]: f for f in (case_linear_4bit, case_double_quant_and_prepared, case_lora_linear_4bit,
                                     case_lora_linear, case_quantize, case_rms_norm_swiglu, case_attention, case_rope,
                                     case_native_decode, case_cross_entropy, case_adamw)}


RUNS = [(case, where, M) for case in CASES for where in ("end", "start") for M in (1, 3, 37)]


def _child(isa: str, first: int) -> None:
    """Runs RUNS[first:] on one path, naming each run before it starts (a fault kills the
    process: the parent reads which run it was, then goes on after it)."""
    with on_path("cpu", isa):
        for i in range(first, len(RUNS)):
            print(f"run {i}", flush=True)
            CASES[RUNS[i][0]](*RUNS[i][1:])
    print("done", flush=True)


@pytest.mark.parametrize("isa", kernel_paths())
def test_kernels_stay_inside_their_tensors(isa):
    """Every run on this path in a child process; every run that faults is reported."""
    faulted, first = [], 0
    while first < len(RUNS):
        r = subprocess.run([sys.executable, "-c", f"import tests.test_guard_pages as g; g._child({isa!r}, {first})"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
        if r.returncode == 0 and r.stdout.rstrip().endswith("done"):
            break
        started = [int(x) for x in re.findall(r"run (\d+)", r.stdout)]
        assert r.returncode == -signal.SIGSEGV and started, (r.returncode, r.stdout[-300:], r.stderr[-2000:])
        faulted.append(RUNS[started[-1]])
        first = started[-1] + 1
    assert not faulted, f"{isa}: (case, placement, rows) runs that touched a guard page: {faulted}"


def test_guard_page_faults_one_element_past_the_end():
    """The positive control: a read one element past a guarded tensor kills the process (if
    it did not, the test above would prove nothing)."""
    code = ("import torch, tests.test_guard_pages as g; t = g.guarded(torch.ones(5), 'end'); "
            "torch.empty(6).copy_(torch.as_strided(t, (6,), (1,)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=300)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr.decode()[-500:])
