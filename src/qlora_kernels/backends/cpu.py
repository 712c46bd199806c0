"""The cpu backend: the C++ extension (qlora_kernels._C), its ISA path (scalar, avx2,
avx512, avx512vnni) chosen at run time by csrc/dispatch. Threads follow
torch.get_num_threads(). The LoRA forward of few rows is one native call (csrc/lora4.h);
for more rows, and for the LoRA backward and DoRA, the kernels are the reference
backend's generic ones: this backend's 4-bit GEMM with the rank-r products in torch."""
from __future__ import annotations

import functools
import math

import torch

from .. import _C, formats, tuning
from .._errors import nonfinite_error
from ..formats import dtype_code
from . import register_dequantize_from_out, register_kernel
from .reference import dense_out
from .reference import lora_linear_4bit_backward as _reference_lora_backward



@functools.cache
def _tables(quant_type: str):
    bounds, order = formats.quant_tables(quant_type)
    return formats.codebook(quant_type), bounds, order


@register_kernel("quantize_4bit", "cpu")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    n = A.numel()
    packed = torch.empty((formats.packed_numel(n), 1), dtype=torch.uint8)
    absmax = torch.empty((formats.num_blocks(n, blocksize),), dtype=torch.float32)
    code, bounds, order = _tables(quant_type)
    bad = _C.quantize_4bit(A.data_ptr(), dtype_code(A.dtype), n, blocksize, code.data_ptr(), bounds.data_ptr(),
                           order.data_ptr(), packed.data_ptr(), packed.numel(), absmax.data_ptr(), absmax.numel(),
                           torch.get_num_threads())
    if bad >= 0:
        raise nonfinite_error(bad, blocksize)
    return packed, absmax


@register_kernel("dequantize_4bit_out", "cpu")
def dequantize_4bit_out(packed, absmax, blocksize, quant_type, out):
    code = _tables(quant_type)[0]
    _C.dequantize_4bit(packed.data_ptr(), packed.numel(), absmax.data_ptr(), absmax.numel(), code.data_ptr(),
                       out.numel(), blocksize, out.data_ptr(), dtype_code(out.dtype), torch.get_num_threads())


register_dequantize_from_out("cpu", dequantize_4bit_out)


@register_kernel("quantize_blockwise_8bit", "cpu")
def quantize_blockwise_8bit(A, code, blocksize):
    out = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty((formats.num_blocks(A.numel(), blocksize),), dtype=torch.float32)
    _C.quantize_8bit(A.data_ptr(), A.numel(), blocksize, code.data_ptr(), code.numel(), out.data_ptr(), absmax.data_ptr(),
                     absmax.numel())
    return out, absmax


@register_kernel("dequantize_blockwise_8bit", "cpu")
def dequantize_blockwise_8bit(q, absmax, code, blocksize):
    out = torch.empty(q.shape, dtype=torch.float32)
    _C.dequantize_8bit(q.data_ptr(), absmax.data_ptr(), absmax.numel(), code.data_ptr(), code.numel(), q.numel(), blocksize,
                       out.data_ptr())
    return out


# ---- fused 4-bit linear (csrc/linear4_*): never materializes the fp32 weight ----
if hasattr(_C, "linear4_forward"):

    def _bind(entry, code, packed, absmax, blocksize, out_features):
        """``f(x, bias) -> y`` of a linear4 entry (``linear4_forward``, the int8 ones) on one
        weight, its pointers and sizes read here once; x contiguous fp32 with any leading
        dims (the op passes it 2-D, a prepared weight's direct call as the caller has it),
        bias None or contiguous fp32. f holds the tensors whose pointers it keeps."""
        N = out_features
        weight_args = (packed.data_ptr(), packed.numel(), absmax.data_ptr(), absmax.numel(), code.data_ptr(), N,
                       blocksize)
        keep = (packed, absmax, code)
        empty, f32, nthreads = torch.empty, torch.float32, torch.get_num_threads

        def f(x, bias, _keep=keep):
            if not tuning.ready:
                tuning.ensure()
            shape = x.shape
            K = shape[-1]
            y = empty(*shape[:-1], N, dtype=f32)  # sizes as arguments: no tuple to build and parse
            # row strides of at least 1: an empty weight ([N, 0] or [0, K]) is a valid layer
            entry(x.data_ptr(), y.numel() // N if N else math.prod(shape[:-1]), K, max(K, 1), *weight_args,
                  0 if bias is None else bias.data_ptr(), 0 if bias is None else bias.numel(), y.data_ptr(),
                  max(N, 1), nthreads())
            return y

        return f

    def _entry(compute: str, quant_type: str):
        """(linear4 entry, its codebook) of a compute mode: fp32 or int8 arithmetic."""
        if compute == "fp32":
            return _C.linear4_forward, _tables(quant_type)[0]
        return _C.linear4_q8_forward, formats.int8_codebook_cpu(quant_type)

    @register_kernel("linear_4bit", "cpu")
    def linear_4bit(x, packed, absmax, blocksize, quant_type, out_features, bias):
        return _bind(*_entry("fp32", quant_type), packed, absmax, blocksize, out_features)(x, bias)

    @register_kernel("linear_4bit_bind", "cpu")
    def linear_4bit_bind(compute, packed, absmax, blocksize, quant_type, out_features):
        """``linear_4bit`` (compute "fp32") or ``linear_4bit_int8`` ("int8") bound to one
        weight as ``f(x, bias)``, for a prepared weight's direct calls, which keep ``f``
        only while packed and absmax are the same tensors with the same storage and size
        (Prepared4bit.current). At one row of a small layer the ten reads and the lookups
        this saves are ~10% of the call (docs/benchmarks.md)."""
        return _bind(*_entry(compute, quant_type), packed, absmax, blocksize, out_features)

    @register_kernel("linear_4bit_int8", "cpu")
    def linear_4bit_int8(x, packed, absmax, blocksize, quant_type, out_features, bias):
        return _bind(*_entry("int8", quant_type), packed, absmax, blocksize, out_features)(x, bias)

    @register_kernel("linear_4bit_int8_one_row", "cpu")
    def int8_one_row(packed, absmax, blocksize, quant_type, out_features, in_features):
        """The one-row int8 forward on a repacked copy of this weight (csrc/linear4_q8.h):
        a callable ``f(x, bias=None) -> y`` for one row of contiguous fp32 ``x`` (and a
        contiguous fp32 ``bias``) that returns None while another ISA is forced; None
        where this CPU has no such kernel. The copy (about the size of ``packed``) is made here,
        once: the caller keeps ``f`` only while the weight and absmax stay unchanged."""
        N, K = out_features, in_features
        if not _C.linear4_q8_repacked_fits(N, K, blocksize):
            return None
        nbytes = _C.linear4_q8_repacked_bytes(N, K, blocksize)
        repacked = torch.empty(nbytes, dtype=torch.uint8)
        _C.linear4_q8_repack(packed.data_ptr(), packed.numel(), N, K, blocksize, repacked.data_ptr(), nbytes,
                             torch.get_num_threads())
        # Same arguments as linear4_q8_forward, the repacked bytes in place of packed.
        bound = _bind(_C.linear4_q8_forward_repacked, formats.int8_codebook_cpu(quant_type), repacked, absmax,
                      blocksize, N)

        def f(x, bias=None):
            if not _C.linear4_q8_repacked_fits(N, K, blocksize):
                return None
            return bound(x, bias)

        return f

    # Rows of x up to which lora_linear_4bit runs as one native call (csrc/lora4.h: the base
    # GEMV, then the rank-r products on the calling thread); above it the base GEMM runs,
    # then the rank-r products on every thread (csrc/lora_rows.cpp), which is faster there.
    # docs/benchmarks.md has the measurement that set it.
    LORA_FUSED_ROWS = 4

    @register_kernel("lora_linear_4bit", "cpu")
    def lora_linear_4bit(x, packed, absmax, blocksize, quant_type, out_features, lora_A, lora_B, scaling, bias,
                         noise, want_u=True):
        """(y, u) as the reference composite computes them; x, bias and noise as the op
        passes them (contiguous fp32; functional's inference path passes x with any
        leading dims, noise None). u is [rows, r] fp32; ``want_u=False`` (inference, where
        no backward needs it; this backend's kernel alone takes it) may return None for it."""
        K = x.shape[-1]
        M = x.numel() // K if K else math.prod(x.shape[:-1])
        if M > LORA_FUSED_ROWS and K > 0 and out_features > 0:
            x2 = x.reshape(M, K)
            y = linear_4bit(x2, packed, absmax, blocksize, quant_type, out_features, bias)
            xd = x2 if noise is None else x2 * noise.reshape(M, K)
            A, B = lora_A.float().contiguous(), lora_B.float().contiguous()
            u = torch.empty((M, A.shape[0]), dtype=torch.float32)
            _C.lora_rows_forward(xd.data_ptr(), xd.numel(), M, K, A.data_ptr(), A.numel(), B.data_ptr(), B.numel(),
                                 A.shape[0], scaling, y.data_ptr(), y.numel(), out_features, u.data_ptr(), u.numel(),
                                 torch.get_num_threads())
            return y.view(*x.shape[:-1], out_features), u
        if not tuning.ready:
            tuning.ensure()
        A = lora_A.float().contiguous()
        B = lora_B.float().contiguous()
        if noise is not None:
            noise = noise.float().contiguous()
        y = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32)
        u = torch.empty((M, A.shape[0]), dtype=torch.float32) if want_u else None
        ld = max(K, 1)
        _C.lora4_forward(x.data_ptr(), M, K, ld, noise.data_ptr() if noise is not None else 0, ld, packed.data_ptr(),
                         packed.numel(), absmax.data_ptr(), absmax.numel(), _tables(quant_type)[0].data_ptr(),
                         out_features, blocksize, bias.data_ptr() if bias is not None else 0,
                         bias.numel() if bias is not None else 0, A.data_ptr(), B.data_ptr(), A.shape[0], scaling,
                         y.data_ptr(), max(out_features, 1), 0 if u is None else u.data_ptr(), torch.get_num_threads())
        return y, u

    @register_kernel("lora_linear_4bit_backward", "cpu")
    def lora_linear_4bit_backward(dy2, x2, u, packed, absmax, blocksize, quant_type, lora_A, lora_B, scaling, noise2,
                                  need_x):
        """The reference composite below LORA_FUSED_ROWS rows; above, the base input
        gradient (this backend's GEMM) with the adapter's share added in place and dA, dB
        from one native call (csrc/lora_rows.cpp)."""
        M, K = x2.shape
        if M <= LORA_FUSED_ROWS or K == 0 or dy2.shape[1] == 0:
            return _reference_lora_backward(dy2, x2, u, packed, absmax, blocksize, quant_type, lora_A, lora_B,
                                            scaling, noise2, need_x)
        N = dy2.shape[1]
        dx = linear_4bit_grad_input(dy2, packed, absmax, blocksize, quant_type, K) if need_x else None
        xd = (x2 if noise2 is None else x2 * noise2).contiguous()
        A, B = lora_A.float().contiguous(), lora_B.float().contiguous()
        u = u.contiguous()  # the op checked its shape and dtype; the kernel reads it as dense rows
        r = A.shape[0]
        dA = torch.empty((r, K), dtype=torch.float32)
        dB = torch.empty((N, r), dtype=torch.float32)
        # with dropout the adapter's share of dx is masked: computed apart, then multiplied in
        dxl = dx if noise2 is None else (torch.zeros((M, K), dtype=torch.float32) if need_x else None)
        _C.lora_rows_backward(dy2.data_ptr(), dy2.numel(), xd.data_ptr(), xd.numel(), u.data_ptr(), u.numel(), M, K, N,
                              A.data_ptr(), A.numel(), B.data_ptr(), B.numel(), r, scaling, dA.data_ptr(), dA.numel(),
                              dB.data_ptr(), dB.numel(), 0 if dxl is None else dxl.data_ptr(),
                              0 if dxl is None else dxl.numel(), torch.get_num_threads())
        if noise2 is not None and need_x:
            dx.addcmul_(dxl, noise2)
        return dx, dA, dB

    @register_kernel("linear_4bit_grad_input", "cpu")
    def linear_4bit_grad_input(dy2, packed, absmax, blocksize, quant_type, in_features):
        if not tuning.ready:
            tuning.ensure()
        M, N = dy2.shape
        dx = torch.empty((M, in_features), dtype=torch.float32)
        code = _tables(quant_type)[0]
        # dy2 is contiguous (the op makes it so), and its row stride is then N; a one-row
        # tensor may carry any stride (an expanded gradient has 0), which .contiguous() keeps.
        _C.linear4_backward_input(dy2.data_ptr(), M, N, max(N, 1), packed.data_ptr(),
                                  packed.numel(), absmax.data_ptr(), absmax.numel(), code.data_ptr(), in_features,
                                  blocksize, dx.data_ptr(), max(in_features, 1), torch.get_num_threads())
        return dx


# ---- dense fp32 linear (csrc/dense_*): the frozen output head of the fused loss ----
if hasattr(_C, "dense_forward"):

    @register_kernel("linear_dense", "cpu")
    def linear_dense(x2, weight, bias, out=None):
        if not tuning.ready:
            tuning.ensure()
        M, K = x2.shape
        N = weight.shape[0]
        y = dense_out(out, M, N)
        _C.dense_forward(x2.data_ptr(), M, K, max(K, 1), weight.data_ptr(), N, max(K, 1),
                         bias.data_ptr() if bias is not None else 0, bias.numel() if bias is not None else 0,
                         y.data_ptr(), max(N, 1), torch.get_num_threads())
        return y

    @register_kernel("linear_dense_grad_input", "cpu")
    def linear_dense_grad_input(dy2, weight, out=None):
        if not tuning.ready:
            tuning.ensure()
        M, N = dy2.shape
        K = weight.shape[1]
        dx = dense_out(out, M, K)
        _C.dense_backward_input(dy2.data_ptr(), M, N, max(N, 1), weight.data_ptr(), K, max(K, 1), dx.data_ptr(),
                                max(K, 1), torch.get_num_threads())
        return dx


# ---- fused AdamW (csrc/adamw_*): one native call per parameter group ----
@register_kernel("adamw_step", "cpu")
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize):
    _C.adamw_step([t.data_ptr() for t in params], [t.data_ptr() for t in grads],
                  [t.data_ptr() for t in exp_avgs], [t.data_ptr() for t in exp_avg_sqs],
                  [t.numel() for t in params], list(steps), lr, beta1, beta2, eps, weight_decay, maximize,
                  torch.get_num_threads())


# ---- fused RMSNorm / SwiGLU (csrc/norm_act_*): one pass each way ----
def _span(t: torch.Tensor) -> int:
    """Elements of t's storage from its first element on: what the C++ side checks a strided
    operand's last row against."""
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


def _ld(t2: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A [rows, N] tensor with unit column stride, its row stride (rows must not overlap) and
    its span (_span)."""
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < t2.shape[1]):
        t2 = t2.contiguous()
    return t2, t2.stride(0) if t2.shape[0] > 1 else t2.shape[1], _span(t2)


@register_kernel("rms_norm", "cpu")
def rms_norm(x2, weight, eps):
    M, K = x2.shape
    y = torch.empty((M, K), dtype=torch.float32)
    rstd = torch.empty((M,), dtype=torch.float32)
    _C.rms_norm_forward(x2.data_ptr(), x2.numel(), M, K, weight.data_ptr(), weight.numel(), eps, y.data_ptr(),
                        y.numel(), rstd.data_ptr(), rstd.numel(), torch.get_num_threads())
    return y, rstd


@register_kernel("rms_norm_backward", "cpu")
def rms_norm_backward(dy2, x2, weight, rstd, need_dweight):
    M, K = x2.shape
    dx = torch.empty((M, K), dtype=torch.float32)
    dw = torch.empty((K,), dtype=torch.float32) if need_dweight else None
    _C.rms_norm_backward(dy2.data_ptr(), dy2.numel(), x2.data_ptr(), x2.numel(), weight.data_ptr(), weight.numel(),
                         rstd.data_ptr(), rstd.numel(), M, K, dx.data_ptr(), dx.numel(),
                         0 if dw is None else dw.data_ptr(), 0 if dw is None else dw.numel(), torch.get_num_threads())
    return dx, dw


@register_kernel("swiglu", "cpu")
def swiglu(gate2, up2):
    (g, ldg, gs), (u, ldu, us) = _ld(gate2), _ld(up2)
    M, N = g.shape
    h = torch.empty((M, N), dtype=torch.float32)
    _C.swiglu_forward(g.data_ptr(), gs, ldg, u.data_ptr(), us, ldu, M, N, h.data_ptr(), h.numel(),
                      torch.get_num_threads())
    return h


@register_kernel("swiglu_backward", "cpu")
def swiglu_backward(dh2, gate2, up2):
    (g, ldg, gs), (u, ldu, us) = _ld(gate2), _ld(up2)
    M, N = g.shape
    dh = dh2.contiguous()
    dg = torch.empty((M, N), dtype=torch.float32)
    du = torch.empty((M, N), dtype=torch.float32)
    _C.swiglu_backward(dh.data_ptr(), dh.numel(), g.data_ptr(), gs, ldg, u.data_ptr(), us, ldu, M, N, dg.data_ptr(),
                       dg.numel(), du.data_ptr(), du.numel(), torch.get_num_threads())
    return dg, du


@register_kernel("softmax_xent", "cpu")
def softmax_xent(logits, labels):
    """csrc/norm_act.h's row pass: one read of the logits for the max, one exp pass, one scale
    (the row stays in L2), where torch's log_softmax, exp_, gather and scatter each pass over it."""
    M, V = logits.shape
    lab = labels.contiguous()
    loss = torch.empty((M,), dtype=torch.float32)
    _C.softmax_xent_rows(logits.data_ptr(), logits.numel(), M, V, lab.data_ptr(), lab.numel(), loss.data_ptr(),
                         loss.numel(), torch.get_num_threads())
    return loss


# ---- causal attention of a training step (csrc/attention_*) ----
def _view(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(pointer, elements reachable from it, batch / head / position strides) of a 4-D fp32
    tensor with a contiguous last dimension: what the C++ side checks every index against."""
    return t.data_ptr(), _span(t), t.stride(0), t.stride(1), t.stride(2)


def _key_lengths(key_lengths):
    return None if key_lengths is None else key_lengths.to(torch.int64).contiguous()


@register_kernel("causal_attention", "cpu")
def causal_attention(q, k, v, scale, key_lengths=None):
    B, H, S, D = q.shape
    out = torch.empty((B, S, H, D), dtype=torch.float32)
    lse = torch.empty((B, H, S), dtype=torch.float32)
    kl = _key_lengths(key_lengths)
    _C.attention_forward(_view(q), _view(k), _view(v), B, H, k.shape[1], S, D, scale, _view(out.transpose(1, 2)),
                         lse.data_ptr(), lse.numel(), 0 if kl is None else kl.data_ptr(), 0 if kl is None else kl.numel(),
                         torch.get_num_threads())
    return out, lse


@register_kernel("causal_attention_backward", "cpu")
def causal_attention_backward(dout, q, k, v, out, lse, scale, key_lengths=None):
    B, H, S, D = q.shape
    kl = _key_lengths(key_lengths)
    dq = torch.empty((B, H, S, D), dtype=torch.float32)
    dk = torch.empty(k.shape, dtype=torch.float32)
    dv = torch.empty(v.shape, dtype=torch.float32)
    _C.attention_backward(_view(dout.transpose(1, 2)), _view(q), _view(k), _view(v), _view(out.transpose(1, 2)),
                          lse.data_ptr(), lse.numel(), B, H, k.shape[1], S, D, scale, _view(dq), _view(dk),
                          _view(dv), 0 if kl is None else kl.data_ptr(), 0 if kl is None else kl.numel(),
                          torch.get_num_threads())
    return dq, dk, dv


@register_kernel("rope", "cpu")
def rope(q, k, cos, sin, backward):
    """csrc/rope.cpp on q and k (fp32, contiguous last dimension; cos and sin fp32 contiguous
    [1 or B, S, D]): fresh [B, S, heads, D] outputs."""
    outs = []
    for x in (q, k):
        B, H, S, D = x.shape
        out = torch.empty((B, S, H, D), dtype=torch.float32)
        _C.rope(*_view(x), B, H, S, D, cos.data_ptr(), sin.data_ptr(), cos.numel(), 0 if cos.shape[0] == 1 else S * D,
                out.data_ptr(), out.numel(), backward, torch.get_num_threads())
        outs.append(out)
    return tuple(outs)
