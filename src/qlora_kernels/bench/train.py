"""Training-step benchmark cases: one AdamW step of LoRA r=16 on every projection, batch
2 x 256 tokens, on a random Phi-3-architecture model (hidden 1024, intermediate 2816, 4
layers, vocab 32064) and on SmolLM2-135M-Instruct, with qlora-kernels' layers beside
PEFT + bitsandbytes QLoRA (and PEFT LoRA on the fp32 base) on the same weights."""
from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import time
import warnings
from typing import Callable, Optional

import torch

from .harness import Case, Span
from .peers import bnb_quantize_model

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

PHI3_BENCH = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32064, max_position_embeddings=512, pad_token_id=0)
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def random_phi3():
    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Phi3Config(**PHI3_BENCH), dtype=torch.float32), "phi3"


def smollm2():
    from ..finetune.smollm2 import load_smollm2

    return load_smollm2(), "llama"


def build(kind: str, base, arch: str, use_dora: bool = False):
    """A PEFT model of one kind: 'ours' (qlora-kernels NF4 with the fused output head +
    loss and the fused RMSNorm / SwiGLU), 'ours-no-norm-mlp' (the same with transformers'
    RMSNorm and MLP math), 'ours-unfused' (neither: transformers' loss, norm and MLP), 'bnb'
    (PEFT + bitsandbytes NF4) or 'dense' (PEFT on the fp32 base)."""
    from peft import LoraConfig

    from .. import quantize_model
    from ..integrations.peft import get_peft_model

    model = copy.deepcopy(base)
    if kind in ("ours", "ours-no-norm-mlp", "ours-unfused"):
        model = quantize_model(model, "nf4", 64, double_quant=True, fuse_loss=kind != "ours-unfused",
                               fuse_norm_mlp=kind == "ours")
    elif kind == "bnb":
        model = bnb_quantize_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS[arch], lora_dropout=0.0, use_dora=use_dora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, cfg)
    pm.train()
    return pm


def step_fn(pm, batch_size: int = 2, seq: int = 256, vocab: int = 32064,
            loss_span: bool = False) -> Callable[[], Optional[Span]]:
    """One AdamW step of ``pm``; with ``loss_span`` the step returns the seconds it spent on
    the output head + loss: in the forward from the final norm's output to the loss, in the
    backward from ``backward()`` to the gradient reaching that output (nothing else runs in
    between: the head and the loss are the last of the forward and the first of the
    backward)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch_size, seq), generator=g)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    marks: dict[str, float] = {}
    if loss_span:
        def after_norm(_module, _inputs, out):
            if out.requires_grad:  # a forward without autograd (evaluation) has no backward to time
                marks["forward"] = time.perf_counter()
                out.register_hook(lambda _grad: marks.__setitem__("backward_end", time.perf_counter()))

        pm.get_base_model().model.norm.register_forward_hook(after_norm)

    def step() -> Optional[Span]:
        marks.clear()
        opt.zero_grad(set_to_none=True)
        # the backward starts where the forward's part ends: one interval holds both parts
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        return Span(marks["backward_end"] - marks["forward"]) if loss_span else None

    return step


def attention_cases() -> list[Case]:
    """The fused causal attention alone, forward + backward, at the training step's batch
    2 x 256: SmolLM2's heads (9 query / 3 key-value heads of 64) and the Phi-3 bench
    model's (16 of 64, no grouping), beside torch's scaled_dot_product_attention (its CPU
    flash kernel, what transformers' 'sdpa' runs) on the same tensors, q laid out as
    transformers passes it. Work: the causal FLOPs (forward 2 products, backward 5, each
    2 B H S^2 D / 2)."""
    import torch.nn.functional as F

    from ..functional import causal_attention

    cases = []
    g = torch.Generator().manual_seed(0)
    for name, H, Hk in (("smollm2", 9, 3), ("phi3", 16, 16)):
        B, S, D = 2, 256, 64
        q = torch.randn(B, S, H, D, generator=g).transpose(1, 2).requires_grad_()
        k = torch.randn(B, Hk, S, D, generator=g).requires_grad_()
        v = torch.randn(B, Hk, S, D, generator=g).requires_grad_()
        do = torch.randn(B, H, S, D, generator=g)
        flops = 7 * B * H * S * S * D

        def run(f, q=q, k=k, v=v, do=do):
            q.grad = k.grad = v.grad = None
            f(q, k, v).backward(do)

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        group = f"causal attention fwd+bwd {name} {B}x{S}, {H}/{Hk} heads of {D}"
        cases += [Case(group, "qlora-kernels causal_attention", lambda run=run: run(causal_attention), True, flops,
                       "GFLOP/s"),
                  Case(group, "torch scaled_dot_product_attention", lambda run=run: run(sdpa), False, flops,
                       "GFLOP/s")]
    # A right-padded batch as the finetune collator writes it (4 examples padded to the longest,
    # SmolLM2's heads): the kernel with key_lengths beside sdpa with transformers' boolean mask.
    B, S, D, H, Hk = 4, 128, 64, 9, 3
    lengths = torch.tensor([128, 97, 64, 41])
    pos = torch.arange(S)
    mask = ((pos[:, None] >= pos[None, :]) & (pos < lengths[:, None, None]))[:, None]
    q = torch.randn(B, S, H, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Hk, S, D, generator=g).requires_grad_()
    v = torch.randn(B, Hk, S, D, generator=g).requires_grad_()
    do = torch.randn(B, H, S, D, generator=g)

    def run_padded(f):
        q.grad = k.grad = v.grad = None
        f().backward(do)

    group = f"causal attention fwd+bwd smollm2 right-padded {B}x{S}, lengths {'/'.join(map(str, lengths.tolist()))}"
    flops = 7 * B * H * S * S * D
    cases += [Case(group, "qlora-kernels causal_attention (key_lengths)",
                   lambda: run_padded(lambda: causal_attention(q, k, v, key_lengths=lengths)), True, flops, "GFLOP/s"),
              Case(group, "torch scaled_dot_product_attention (boolean mask)",
                   lambda: run_padded(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)),
                   False, flops, "GFLOP/s")]
    return cases


def dropout_cases() -> list[Case]:
    """LoRA's dropout mask at a finetune micro-batch's projection (256 x 576, p = 0.05): the
    same lora_linear call (an 8-output base, r = 1, so the mask dominates) with the native
    counter-based mask (the default) and with torch's bernoulli_(1 - p).div_(1 - p)
    (QLORA_KERNELS_DROPOUT=torch: what F.dropout and PEFT's nn.Dropout draw). Work: elements."""
    import os

    from .._env import DROPOUT
    from ..functional import lora_linear

    x = torch.randn(256, 576)
    W, A, B = torch.randn(8, 576), torch.zeros(1, 576), torch.zeros(8, 1)
    group = "LoRA dropout mask 256x576 p=0.05 (lora_linear, 8 outputs, r=1)"

    def call(rng):
        before = os.environ.get(DROPOUT)
        os.environ[DROPOUT] = rng
        try:
            lora_linear(x, W, A, B, 1.0, dropout_p=0.05, training=True)
        finally:
            if before is None:
                del os.environ[DROPOUT]
            else:
                os.environ[DROPOUT] = before

    return [Case(group, "qlora-kernels native mask", lambda: call("native"), True, x.numel(), "elem/s"),
            Case(group, "torch bernoulli_ mask (QLORA_KERNELS_DROPOUT=torch)", lambda: call("torch"), False,
                 x.numel(), "elem/s")]


class StepWorker:
    """One training-step case in a process of its own, built there on first call; each call
    runs one step there (the harness times the round trip, ~0.1 ms of a 1-3 s step).

    Why a process each: stepped in turn in one process, the five models of a group slowed
    each other's steps, the peers' most. SmolLM2's step on the same AMD EPYC Zen 5 under the
    AVX2 mask, 2 threads: in one process with the group's five models, ours 1.80 s and PEFT +
    bitsandbytes 3.00 s (1.67x); ours and bitsandbytes each in its own process, 8 alternating
    rounds, 1.69 s and 2.42 s (1.42x). A user's training runs one model in its process, so the
    process-per-case number is the one that holds (docs/benchmarks.md)."""

    def __init__(self, which: str, kind: str, use_dora: bool = False, loss_span: bool = False):
        self.args = [which, kind, "1" if use_dora else "0", "1" if loss_span else "0"]
        self.loss_span = loss_span
        self.p: subprocess.Popen | None = None

    def __call__(self) -> Optional[Span]:
        """One step; with ``loss_span`` its head + loss seconds as the harness's Span."""
        if self.p is None:
            self._start()
        self.p.stdin.write("step\n")
        self.p.stdin.flush()
        reply = self._expect("ok").split()
        if not self.loss_span:
            return None
        if len(reply) != 2:
            self.close()
            raise RuntimeError(f"training-step worker {' '.join(self.args)}: no head + loss seconds in {reply}")
        return Span(float(reply[1]))

    def _start(self) -> None:
        # this package where the parent found it, and nothing else of the parent's path (its
        # script's folder could shadow a module the worker imports)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p))
        self.p = subprocess.Popen([sys.executable, "-P", "-m", "qlora_kernels.bench.train", *self.args,
                                   str(torch.get_num_threads())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env)
        self._expect("ready")

    def _expect(self, word: str) -> str:
        reply = self.p.stdout.readline().strip()
        if reply.split(" ", 1)[0] != word:
            self.close()
            raise RuntimeError(f"training-step worker {' '.join(self.args)}: {reply or 'exited without a reply'}")
        return reply

    def close(self) -> None:
        """Ends the worker process (the next call starts a new one)."""
        if self.p is not None:
            p, self.p = self.p, None
            p.stdin.close()
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()


def _serve(which: str, kind: str, dora: str, loss_span: str, threads: str) -> int:
    """A StepWorker's process: replies on the original stdout only (libraries' prints go to stderr)."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(int(threads))
    try:
        loaders = {"phi3": random_phi3, "smollm2": smollm2}
        if which not in loaders:
            raise ValueError(f"unknown model {which!r} (phi3 or smollm2)")
        base, arch = loaders[which]()
        step = step_fn(build(kind, base, arch, dora == "1"), vocab=base.config.vocab_size, loss_span=loss_span == "1")
        del base
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the benchmark
        print(f"error {type(e).__name__}: {e}", file=replies, flush=True)
        return 1
    print("ready", file=replies, flush=True)
    for _ in sys.stdin:
        try:
            span = step()
            print("ok" if span is None else f"ok {float(span)!r}", file=replies, flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"error {type(e).__name__}: {e}", file=replies, flush=True)
    return 0


def train_cases(which: str = "phi3") -> list[Case]:
    """The training-step groups of one model, each case a StepWorker (close them with
    harness.release when their group is done)."""
    import importlib.util

    if which == "smollm2":
        from ..finetune.smollm2 import smollm2_hf_dir

        smollm2_hf_dir()  # converts the model once here (OSError where it cannot), not in every worker
    have_bnb = all(importlib.util.find_spec(m) is not None for m in ("bitsandbytes", "peft"))
    tokens = 2 * 256
    g = f"train step {which} LoRA r=16 all projections 2x256"
    cases = []
    for kind, name, ours in (("ours", "qlora-kernels QLoRA (NF4), fused head + loss, norm, MLP", True),
                             ("ours-no-norm-mlp", "qlora-kernels QLoRA (NF4), fused head + loss only", False),
                             ("ours-unfused", "qlora-kernels QLoRA (NF4), transformers' loss", False),
                             ("bnb", "PEFT + bitsandbytes QLoRA (NF4)", False),
                             ("dense", "PEFT LoRA on the fp32 base", False)):
        if kind == "bnb" and not have_bnb:
            logging.getLogger(__name__).warning("peer %s unavailable: bitsandbytes or peft not installed", name)
            continue
        cases.append(Case(g, name, StepWorker(which, kind), ours, tokens, "tokens/s"))
    # The same steps, timed on the output head + loss alone (bench.Span): our layers in both,
    # the fused head + loss against transformers' head and loss. Its share of the whole step
    # bounds what the loss can do for the step's ratio (the group above).
    gl = f"head + loss inside the train step {which} LoRA r=16 2x256"
    cases.append(Case(gl, "qlora-kernels fused head + loss (in the step)",
                      StepWorker(which, "ours-no-norm-mlp", loss_span=True), True))
    cases.append(Case(gl, "transformers' head + loss (in the step, our layers)",
                      StepWorker(which, "ours-unfused", loss_span=True), False))
    gd = f"train step {which} DoRA vs LoRA r=16 2x256"
    cases.append(Case(gd, "qlora-kernels QLoRA (NF4) LoRA", StepWorker(which, "ours"), True, tokens, "tokens/s"))
    cases.append(Case(gd, "qlora-kernels QLoRA (NF4) DoRA", StepWorker(which, "ours", True), False, tokens,
                      "tokens/s"))
    if have_bnb:
        cases.append(Case(gd, "PEFT + bitsandbytes DoRA (NF4)", StepWorker(which, "bnb", True), False, tokens,
                          "tokens/s"))
    return cases


def loss_cases() -> list[Case]:
    """The output head + loss of the training-step cases alone (forward + backward, frozen
    head): the fused linear_cross_entropy beside transformers' way (F.linear, then
    F.cross_entropy on fp32 logits); and the dense head GEMM beside torch's."""
    import torch.nn.functional as F

    from ..backends import run
    from ..functional import linear_cross_entropy

    cases = []
    for name, K, V in (("phi3", 1024, 32064), ("smollm2", 576, 49152)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, K, generator=g).requires_grad_()
        W = torch.randn(V, K, generator=g) / K ** 0.5
        labels = torch.randint(0, V, (512,), generator=g)
        group = f"head + loss fwd+bwd 512 tokens {name} {K}->{V}"
        flops = 4.0 * 512 * K * V

        def fused(x=x, W=W, labels=labels):
            linear_cross_entropy(x, W, labels).backward()

        def unfused(x=x, W=W, labels=labels):
            F.cross_entropy(F.linear(x, W).float(), labels).backward()

        cases += [Case(group, "qlora-kernels linear_cross_entropy", fused, True, flops, "GFLOP/s"),
                  Case(group, "torch F.linear + F.cross_entropy", unfused, False, flops, "GFLOP/s")]
        xd = x.detach()
        gd = f"dense fp32 linear 512x{K}->{V}"
        cases += [Case(gd, "qlora-kernels dense kernel", lambda xd=xd, W=W: run("linear_dense", xd, W, None), True,
                       flops / 2, "GFLOP/s"),
                  Case(gd, "torch x @ W.T", lambda xd=xd, W=W: xd @ W.t(), False, flops / 2, "GFLOP/s")]
    return cases


def norm_act_cases() -> list[Case]:
    """The fused RMSNorm and SwiGLU alone, forward + backward, at the training step's 512
    tokens: beside transformers' LlamaRMSNorm (SmolLM2's 576 and a 1024 hidden size) and
    beside F.silu(gate) * up (SmolLM2's intermediate 1536). Work is elements per call."""
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from ..functional import swiglu
    from ..nn import RMSNorm

    cases = []
    g = torch.Generator().manual_seed(0)
    for K in (576, 1024):
        x = torch.randn(512, K, generator=g).requires_grad_()
        dy = torch.randn(512, K, generator=g)
        hf = LlamaRMSNorm(K, eps=1e-5)
        ours = RMSNorm(K, 1e-5, hf.weight)
        group = f"RMSNorm fwd+bwd [512, {K}]"

        def run(m, x=x, dy=dy):
            x.grad = None
            m.weight.grad = None
            m(x).backward(dy)

        cases += [Case(group, "qlora-kernels rms_norm", lambda m=ours, run=run: run(m), True, 512 * K, "elem/s"),
                  Case(group, "transformers LlamaRMSNorm", lambda m=hf, run=run: run(m), False, 512 * K, "elem/s")]
    N = 1536
    gate = torch.randn(512, N, generator=g).requires_grad_()
    up = torch.randn(512, N, generator=g).requires_grad_()
    dh = torch.randn(512, N, generator=g)

    def fused():
        gate.grad = up.grad = None
        swiglu(gate, up).backward(dh)

    def unfused():
        gate.grad = up.grad = None
        (F.silu(gate) * up).backward(dh)

    group = f"SwiGLU fwd+bwd [512, {N}]"
    cases += [Case(group, "qlora-kernels swiglu", fused, True, 512 * N, "elem/s"),
              Case(group, "torch F.silu(gate) * up", unfused, False, 512 * N, "elem/s")]
    return cases + rope_cases()


def rope_cases() -> list[Case]:
    """The fused rotary embedding alone, forward + backward, on SmolLM2's queries and keys
    (2 x 256 positions, 9 and 3 heads of 64) as its attention layers hand them over, beside
    transformers' apply_rotary_pos_emb. Work is q and k elements per call."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from ..functional import rope

    B, S, H, Hk, D = 2, 256, 9, 3, 64
    g = torch.Generator().manual_seed(0)
    q0 = torch.randn(B, S, H * D, generator=g).requires_grad_()
    k0 = torch.randn(B, S, Hk * D, generator=g).requires_grad_()
    freqs = torch.arange(S, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)
    emb = torch.cat((freqs, freqs), -1)[None].expand(B, S, D).contiguous()  # [B, S, D], as transformers makes it
    cos, sin = emb.cos(), emb.sin()
    dq, dk = torch.randn(B, H, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)

    def run(fn):
        q, k = q0.view(B, S, H, D).transpose(1, 2), k0.view(B, S, Hk, D).transpose(1, 2)
        qe, ke = fn(q, k, cos, sin)
        torch.autograd.grad([qe, ke], [q0, k0], [dq, dk])

    group = f"RoPE fwd+bwd smollm2 {B}x{S}, {H}/{Hk} heads of {D}"
    work = B * S * (H + Hk) * D
    return [Case(group, "qlora-kernels rope", lambda: run(rope), True, work, "elem/s"),
            Case(group, "transformers apply_rotary_pos_emb", lambda: run(apply_rotary_pos_emb), False, work,
                 "elem/s")]


if __name__ == "__main__":
    sys.exit(_serve(*sys.argv[1:]))
