"""Benchmark cases for the fused 4-bit linear and LoRA layers, each beside its peers on
the same inputs (see PEERS.md): torch dense fp32 (MKL), PyTorch's int4 CPU kernel (bf16
activations), ONNX Runtime MatMulNBits (int4, symmetric, block 64) and MatMulBnb4 (NF4),
bitsandbytes matmul_4bit, and for the LoRA layer PEFT on bitsandbytes and on nn.Linear."""
from __future__ import annotations

import contextlib
import logging

import torch

from .. import functional
from .harness import Case

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

PHI3_SHAPES = {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384), "down": (8192, 3072)}
# SmolLM2-135M (hidden 576, 9 heads / 3 KV heads of 64, intermediate 1536): the small
# models people fine-tune on CPUs; (in, out) as above.
SMOLLM2_SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}


def _stream_bytes(cases: list[Case], M: int, K: int, N: int) -> list[Case]:
    """At M=1 a linear layer streams its weight once a call: the bytes each implementation
    reads (4-bit codes plus one scale per 64 weights for the 4-bit kinds, 4 bytes a weight
    for dense fp32), so rows report the fraction of the bandwidth of the level they live in."""
    if M == 1:
        for c in cases:
            c.extra["stream_bytes"] = 4 * N * K if "dense" in c.name else N * K // 2 + 4 * (N * K // 64)
    return cases


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ort_session(W: torch.Tensor, kind: str, M: int, accuracy_level: int = 0):
    """A one-MatMul ONNX model (X[M, K] @ W.T), weight-quantized by ORT's own quantizer."""
    from ..integrations.onnx import contrib

    return contrib.session(contrib.ort_quantized_model(W, kind, accuracy_level))


def _torch_int4(W: torch.Tensor):
    """PyTorch's CPU int4 weight-only kernel: symmetric int4 with group 64, as ((q - 8) *
    scale + zero) with zero = 0; bf16 activations (its vectorised path)."""
    N, K = W.shape
    g = W.reshape(N, K // 64, 64)
    scale = g.abs().amax(-1).clamp(min=1e-8) / 7
    q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + 8, 0, 15).to(torch.int32).reshape(N, K)
    wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).to(torch.bfloat16).contiguous()
    return wp, sz


def _torch_int4_cases(g: str, W: torch.Tensor, x: torch.Tensor, flops: float) -> list[Case]:
    try:
        wp, sz = _torch_int4(W)
        xb = x.to(torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(xb, wp, 64, sz)
    except Exception as e:  # not every torch build has it
        logging.getLogger(__name__).warning("torch int4 peer unavailable: %s", e)
        return []
    return [Case(g, "torch int4 _weight_int4pack_mm_for_cpu (bf16)",
                 lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, wp, 64, sz), False, flops, "GFLOP/s")]


def _ort_cases(g: str, W: torch.Tensor, x: torch.Tensor, flops: float, kinds) -> list[Case]:
    """One case per (kind, accuracy_level, name) of ORT's one-MatMul models."""
    try:
        xn = x.numpy()
        sessions = [(name, _ort_session(W, kind, x.shape[0], level)) for kind, level, name in kinds]
    except ImportError as e:
        logging.getLogger(__name__).warning("ONNX Runtime peers unavailable: %s", e)
        return []
    return [Case(g, name, (lambda s=sess: s.run(None, {"X": xn})), False, flops, "GFLOP/s") for name, sess in sessions]


def linear_inputs(M: int, K: int, N: int):
    """The inputs every linear benchmark shares: (W, x, packed, state, flops), seeded."""
    torch.manual_seed(0)
    W = torch.randn(N, K) * 0.02
    x = torch.randn(M, K)
    packed, state = functional.quantize_4bit(W, "nf4", 64)
    return W, x, packed, state, 2.0 * M * K * N


def linear_cases(M: int, K: int, N: int, label: str = "", peers: bool = True) -> list[Case]:
    W, x, packed, state, flops = linear_inputs(M, K, N)
    g = f"linear M={M} {K}->{N}{(' ' + label) if label else ''}"
    w = functional.prepare_4bit(packed, state)  # as a layer holds it (the peers' weights are prepacked too)
    cases = [Case(g, "qlora-kernels linear_4bit", lambda: functional.linear_4bit(x, w), True, flops, "GFLOP/s")]
    if not peers:
        return _stream_bytes(cases, M, K, N)
    cases.append(Case(g, "torch dense fp32 x @ W.T", lambda: x @ W.t(), False, flops, "GFLOP/s"))
    cases += _torch_int4_cases(g, W, x, flops)
    cases += _ort_cases(g, W, x, flops, (("nbits", 0, "ONNX Runtime MatMulNBits (int4 sym, acc 0)"),
                                         ("bnb4", 0, "ONNX Runtime MatMulBnb4 (NF4)"),
                                         ("nbits", 4, "ONNX Runtime MatMulNBits (int4 sym, acc 4)")))
    try:
        import bitsandbytes as bnb

        qb, sb = bnb.functional.quantize_4bit(W, blocksize=64, quant_type="nf4")
        cases.append(Case(g, "bitsandbytes matmul_4bit", lambda: bnb.matmul_4bit(x, qb.t(), quant_state=sb), False,
                          flops, "GFLOP/s"))
    except ImportError as e:
        logging.getLogger(__name__).warning("bitsandbytes peer unavailable: %s", e)
    return _stream_bytes(cases, M, K, N)


def linear_int8_cases(M: int, K: int, N: int, label: str = "") -> list[Case]:
    """``linear_4bit(compute="int8")`` beside the peers that also compute with quantized
    activations: ORT MatMulNBits accuracy_level=4 (int8) and torch int4 (bf16). A group
    of its own, so that the exact fp32 path's ratios stay against every peer."""
    W, x, packed, state, flops = linear_inputs(M, K, N)
    g = f"linear M={M} {K}->{N}{(' ' + label) if label else ''} int8 compute"
    w = functional.prepare_4bit(packed, state)
    cases = [Case(g, "qlora-kernels linear_4bit compute=int8", lambda: functional.linear_4bit(x, w, compute="int8"),
                  True, flops, "GFLOP/s")]
    cases += _torch_int4_cases(g, W, x, flops)
    cases += _ort_cases(g, W, x, flops, (("nbits", 4, "ONNX Runtime MatMulNBits (int4 sym, acc 4)"),))
    return _stream_bytes(cases, M, K, N)


def lora_layer_cases(M: int = 512, K: int = 4096, N: int = 4096, r: int = 16, alpha: int = 32) -> list[Case]:
    """One QLoRA layer, forward + backward (input and adapter gradients), beside PEFT's LoRA
    layer on a bitsandbytes Linear4bit and on a dense nn.Linear."""
    from .. import nn as qnn

    torch.manual_seed(0)
    dense = torch.nn.Linear(K, N, bias=False)
    dense.weight.requires_grad_(False)
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)
    g = f"LoRA layer fwd+bwd M={M} {K}->{N} r={r}"
    flops = 2 * 2.0 * M * K * N

    # Double quantization on both sides, as the QLoRA recipe and the training-step groups have
    # it (Params4bit's compress_statistics defaults to True; ours had it off until 2026-12-08).
    ours = qnn.LoraLinear(qnn.Linear4bit.from_linear(dense, "nf4", 64, double_quant=True), r=r, lora_alpha=alpha)
    torch.nn.init.normal_(ours.lora_B, std=0.01)

    def run(layer):
        def f():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)
        return f

    cases = [Case(g, "qlora-kernels LoraLinear on Linear4bit (NF4)", run(ours), True, flops, "GFLOP/s",
                  {"double_quant": ours.base_layer.quant_state.nested})]
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model

        def peft_layer(base):
            model = torch.nn.Sequential()
            model.add_module("proj", base)
            pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0))
            return pm

        bl = bnb.nn.Linear4bit(K, N, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        bl.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                      blocksize=64, compress_statistics=True)
        bl = bl.to("cpu")  # Params4bit quantizes on .to(device)
        assert bl.weight.dtype == torch.uint8
        cases.append(Case(g, "PEFT LoRA on bitsandbytes Linear4bit (NF4)", run(peft_layer(bl)), False, flops,
                          "GFLOP/s", {"double_quant": bool(bl.weight.quant_state.nested)}))
        d2 = torch.nn.Linear(K, N, bias=False)
        d2.weight = torch.nn.Parameter(dense.weight.detach().clone(), requires_grad=False)
        cases.append(Case(g, "PEFT LoRA on dense fp32 nn.Linear", run(peft_layer(d2)), False, flops, "GFLOP/s"))
    except ImportError as e:
        logging.getLogger(__name__).warning("PEFT/bitsandbytes peers unavailable: %s", e)
    return cases


def thread_scaling_cases(M: int, K: int = 4096, N: int = 4096) -> list[Case]:
    _, x, packed, state, flops = linear_inputs(M, K, N)
    w = functional.prepare_4bit(packed, state)
    g = f"thread scaling linear_4bit M={M} {K}->{N}"
    out = []
    for t in (1, 2):
        def f(t=t):
            with threads(t):
                functional.linear_4bit(x, w)
        out.append(Case(g, f"qlora-kernels {t} thread{'s' if t > 1 else ''}", f, t == 2, flops, "GFLOP/s",
                        {"threads": t}))
    return out
