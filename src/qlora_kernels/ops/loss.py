"""The fused output head + cross-entropy loss, declared once: ``linear_cross_entropy``.

A causal LM's training loss is ``cross_entropy(hidden @ W.T + b, labels)`` over a vocabulary
of 32k-150k entries. Evaluated the usual way it materializes [tokens, vocab] logits, their
log-softmax and its gradient (three 65 MB tensors for 512 tokens x 32k vocabulary) and it
spends more time there than in every 4-bit layer of a small model together. Here the rows
are taken a chunk at a time: the chunk's logits come from the dense kernel of the selected
backend (csrc/dense_*.cpp on the CPU), the softmax gradient overwrites them in place and is
multiplied straight back into the input gradient, so the backward pass has nothing left to
do but scale by the incoming gradient (the idea of Liger-Kernel's fused linear
cross-entropy; the chunking is ours). Memory stays O(chunk x vocab).

Arithmetic is fp32 like transformers' loss (it upcasts the logits)."""
from __future__ import annotations

from typing import Optional

import torch

from . import checks, eager
from ..backends import run
from .linear import no_autocast

# Logit rows per chunk. Each chunk re-packs the whole weight for the GEMMs, which pays
# off from a few hundred rows (the sweep is in docs/design.md, "The fused output head +
# loss"). So ~32 MiB of logits per chunk, but never fewer than 128 rows.
_CHUNK_BYTES = 32 << 20


def chunk_rows(vocab: int) -> int:
    return max(128, min(4096, _CHUNK_BYTES // (4 * max(vocab, 1))))


def row_step(rows: int, vocab: int) -> int:
    """Rows per chunk: as few chunks as chunk_rows allows, of near-equal size (all but the last
    of ceil(rows / chunks) rows, the last at most chunks - 1 rows shorter). A short last chunk
    (512 rows at SmolLM2's 49152 entries were 170 + 170 + 170 + 2) streams the whole weight
    twice for a few rows; 4 x 128 took 4-6% less time for the loss (docs/benchmarks.md)."""
    cap = chunk_rows(vocab)
    return -(-rows // -(-rows // cap)) if rows > cap else cap


@no_autocast
def linear_cross_entropy_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                         ignore_index: int, grad_x: bool, grad_weight: bool,
                         grad_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dx, dweight, dbias): loss = sum over rows whose label != ignore_index of
    cross_entropy(x @ weight.T + bias, label), fp32, and its gradients with respect to x,
    weight and bias (computed only when asked for; an empty tensor otherwise)."""
    checks.loss(x, weight, bias, labels)
    V, K = weight.shape
    x2 = x.reshape(-1, K).float().contiguous()
    lab = labels.reshape(-1).long()
    w = weight.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    valid = lab != ignore_index
    bad = valid & ((lab < 0) | (lab >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(lab[i])} is outside [0, {V}) and is not ignore_index={ignore_index}")
    M = x2.shape[0]
    total = torch.zeros((), dtype=torch.float32)
    dx = torch.empty((M, K) if grad_x else (0,), dtype=torch.float32)
    dw = torch.zeros((V, K) if grad_weight else (0,), dtype=torch.float32)
    db = torch.zeros((V,) if grad_bias else (0,), dtype=torch.float32)
    any_grad = grad_x or grad_weight or grad_bias
    step = row_step(M, V)
    # one logits buffer for every chunk
    logits = torch.empty((min(step, M), V), dtype=torch.float32)
    for i in range(0, M, step):
        xc, vc = x2[i:i + step], valid[i:i + step]
        # the chunk's logits become their gradient softmax - onehot in place (ignored rows: 0)
        g = run("linear_dense", xc, w, b, logits[:xc.shape[0]])
        total += run("softmax_xent", g, torch.where(vc, lab[i:i + step], -1)).sum()
        if not any_grad:
            continue
        if grad_x:
            run("linear_dense_grad_input", g, w, dx[i:i + step])
        if grad_weight:
            dw.addmm_(g.t(), xc)
        if grad_bias:
            db += g.sum(0)
    if grad_x:
        dx = dx.reshape(x.shape)
    if grad_weight:
        dw = dw.to(weight.dtype)
    return total, dx, dw, db


linear_cross_entropy = torch.library.custom_op("qlora_kernels::linear_cross_entropy",
                                               mutates_args=())(linear_cross_entropy_impl)


@linear_cross_entropy.register_fake
def _(x, weight, bias, labels, ignore_index, grad_x, grad_weight, grad_bias):
    checks.loss(x, weight, bias, labels)
    f32 = torch.float32
    return (x.new_empty((), dtype=f32), x.new_empty(x.shape if grad_x else (0,), dtype=f32),
            x.new_empty(weight.shape if grad_weight else (0,), dtype=weight.dtype),
            x.new_empty((weight.shape[0],) if grad_bias else (0,), dtype=f32))


def _setup(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])
    ctx.meta = (x.dtype, weight.dtype, None if bias is None else bias.dtype, inputs[5:8])


def _backward(ctx, g, *_unused):
    dx, dw, db = ctx.saved_tensors
    x_dtype, w_dtype, b_dtype, (grad_x, grad_weight, grad_bias) = ctx.meta
    out = [None] * 8
    if ctx.needs_input_grad[0]:
        if not grad_x:
            raise RuntimeError("linear_cross_entropy was called without grad_x, so it kept no gradient for x")
        out[0] = (dx * g).to(x_dtype)
    if ctx.needs_input_grad[1]:
        if not grad_weight:
            raise RuntimeError("linear_cross_entropy was called without grad_weight, so it kept no gradient for "
                               "weight")
        out[1] = (dw * g).to(w_dtype)
    if ctx.needs_input_grad[2]:
        if not grad_bias:
            raise RuntimeError("linear_cross_entropy was called without grad_bias, so it kept no gradient for bias")
        out[2] = (db * g).to(b_dtype)
    return tuple(out)


linear_cross_entropy.register_autograd(_backward, setup_context=_setup)
linear_cross_entropy_call = eager.function("qlora_kernels::linear_cross_entropy", linear_cross_entropy,
                                           linear_cross_entropy_impl, _setup, _backward)
