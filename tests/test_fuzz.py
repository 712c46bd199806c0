"""Property-based fuzzing of every public function and op (hypothesis): shapes (0, 1,
odd, not multiples of the blocksize), dtypes, strides (transposed, sliced, expanded with
stride 0, flipped), devices (cpu, meta), blocksizes, quant types, tampered states, bias
lengths and LoRA shapes. Each example must end one of two ways:

* a result equal to the reference backend's on the same arguments (bit for bit where the
  contract says so: quantization and decoding; within the stated fp32 bound otherwise), or
* a ValueError/TypeError whose message names one of the call's arguments, raised the same
  way by the reference backend;

never a crash and never garbage. The example budget is FUZZ_EXAMPLES (CI: the default
below; the long run: scripts/sanitize.sh with FUZZ_EXAMPLES raised). The backends run
here are reference and cpu (every ISA path), and opencl and hls with a fifth of the
budget. The examples that found bugs are kept as explicit examples (``fuzz(examples=...)``,
run first) and in test_reliability.py."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qlora_kernels as qk
from qlora_kernels import formats

from .conftest import native_paths, on_path
from .test_linear import EPS32
from .test_linear_int8 import magnitude

BUDGET = int(os.environ.get("FUZZ_EXAMPLES", "25"))


def _paths():
    out = [pytest.param(("cpu", isa), BUDGET, id=f"cpu-{isa}") for isa in native_paths()]
    for b in ("opencl", "hls"):
        if qk.unavailable_reason(b) is None:
            out.append(pytest.param((b, None), max(3, BUDGET // 5), id=b))
    return out


def fuzz(examples=(), **strategies):
    """Runs a property on every backend path with its example budget (derandomized, so a CI
    run is repeatable; the long run draws more examples, not other seeds). ``examples``:
    the inputs that found bugs, always run first."""
    def deco(fn):
        variants = {}

        def property_for(budget):
            if budget not in variants:
                f = given(**strategies)(fn)
                for e in examples:
                    f = example(**e)(f)
                variants[budget] = settings(max_examples=budget, deadline=None, derandomize=True, database=None,
                                            suppress_health_check=list(HealthCheck))(f)
            return variants[budget]

        @pytest.mark.parametrize("where,budget", _paths())
        def test(where, budget):
            with on_path(*where):
                property_for(budget)(where=where)

        test.__name__ = fn.__name__
        test.__doc__ = fn.__doc__
        return test

    return deco


def outcome(call):
    try:
        return "ok", call()
    except (ValueError, TypeError) as e:
        return "error", e


def check_same(ours, ref, names, compare):
    """Both raised (the same kind, naming an argument), or both returned and `compare` holds."""
    if ours[0] == "error" or ref[0] == "error":
        assert ours[0] == ref[0] == "error", f"one backend raised, the other did not: ours={ours}, reference={ref}"
        assert type(ours[1]) is type(ref[1]), (ours[1], ref[1])
        msg = str(ours[1])
        assert any(n in msg for n in names), f"error does not name an argument {names}: {msg}"
        return
    compare(ours[1], ref[1])


def on_reference(call):
    with qk.use_backend("reference"):
        return outcome(call)


def bits_equal(a, b):
    assert isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape)
    if a.device.type == "meta":
        return
    av, bv = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.is_floating_point():
        view = torch.int32 if a.dtype == torch.float32 else torch.int16
        av, bv = av.view(view), bv.view(view)
    assert torch.equal(av, bv)


# ------------------------------------------------------------------- strategies ----

SHAPE_SIZES = st.sampled_from([0, 1, 2, 3, 7, 16, 31, 33, 64, 65, 127, 130])
FLOATS = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
ANY_DTYPE = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.uint8])
BLOCKSIZES = st.sampled_from(list(formats.BLOCKSIZES) + [0, 16, 48, -64])
QUANT_TYPES = st.sampled_from(["nf4", "fp4", "int4"])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "flipped"])


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same shape family with another memory layout."""
    if t.dim() < 2:
        return t
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        return torch.cat([t, t], dim=-1)[..., ::2]
    if layout == "expanded" and t.shape[0] >= 1:
        return t[:1].expand(t.shape)
    if layout == "flipped":
        return torch.flip(t, dims=[0])
    return t


@st.composite
def tensors(draw, shape, dtype=None, layout=True, scale=1.0):
    dtype = dtype or draw(FLOATS)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * scale).to(dtype)
    return laid_out(t, draw(LAYOUTS)) if layout else t


@st.composite
def weights(draw):
    """A (packed, state) pair, possibly tampered with, and the weight's shape."""
    N = draw(st.sampled_from([1, 2, 7, 33, 64]))
    K = draw(st.sampled_from([1, 7, 64, 65, 128, 130]))
    qt = draw(st.sampled_from(["nf4", "fp4"]))
    bs = draw(st.sampled_from([32, 64, 128]))
    dq = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    packed, state = qk.quantize_4bit(torch.randn(N, K, generator=g) * 0.1, qt, bs, dq)
    tamper = draw(st.sampled_from(["none", "none", "none", "absmax", "shape", "blocksize", "code", "packed", "nested",
                                   "nested_blocksize", "quant_type", "meta_absmax"]))
    s = formats.QuantState(**{**state.__dict__})
    if tamper == "absmax":
        s.absmax = s.absmax[:-1] if s.absmax.numel() > 1 else torch.cat([s.absmax, s.absmax])
    elif tamper == "shape":
        s.shape = torch.Size([N + draw(st.integers(1, 3)), K])
    elif tamper == "blocksize":
        s.blocksize = draw(st.sampled_from([0, 16, 96, bs * 2]))
    elif tamper == "code":
        s.code = s.code[: draw(st.integers(0, 15))]
    elif tamper == "packed":
        packed = packed[: max(packed.numel() - 1, 0)]
    elif tamper == "nested" and s.nested:
        s.state2 = formats.QuantState(**{**s.state2.__dict__, "code": s.state2.code[: draw(st.integers(0, 255))]})
    elif tamper == "nested_blocksize" and s.nested:
        s.state2 = formats.QuantState(**{**s.state2.__dict__, "blocksize": draw(st.sampled_from([0, -1, 1]))})
    elif tamper == "quant_type":
        s.quant_type = "int4"
    elif tamper == "meta_absmax":
        s.absmax = s.absmax.to("meta")
    return packed, s, (N, K)


STATE_NAMES = ("state", "packed", "quant_state", "blocksize", "quant_type", "x ", "x has", "dtype", "shape",
               "same device", "nested")


# --------------------------------------------------------------------- properties ----

@fuzz(data=st.data())
def test_quantize_4bit_fuzz(data, where):
    """quantize_4bit over shapes, dtypes, layouts, blocksizes and quant types."""
    shape = tuple(data.draw(st.lists(SHAPE_SIZES, min_size=1, max_size=3)))
    dtype = data.draw(ANY_DTYPE)
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    W = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    W = laid_out(W, data.draw(LAYOUTS))
    if data.draw(st.booleans()) and W.numel():
        W = W.to("meta") if data.draw(st.booleans()) else W
    bs, qt, dq = data.draw(BLOCKSIZES), data.draw(QUANT_TYPES), data.draw(st.booleans())

    def call():
        p, s = qk.quantize_4bit(W, qt, bs, dq)
        return p, s.absmax if not s.nested else s.state2.absmax

    check_same(outcome(call), on_reference(call), ("W", "blocksize", "quant_type"),
               lambda a, b: (bits_equal(a[0], b[0]), bits_equal(a[1], b[1])))


@fuzz(w=weights(), dtype=FLOATS, use_out=st.booleans())
def test_dequantize_4bit_fuzz(w, dtype, use_out, where):
    """dequantize_4bit (and its out= form) over valid and tampered states."""
    packed, state, _ = w

    def call():
        if use_out:
            out = torch.empty(tuple(state.shape), dtype=dtype) if state.shape.numel() < 2**20 else None
            return qk.dequantize_4bit(packed, state, out=out)
        return qk.dequantize_4bit(packed, state, dtype=dtype)

    check_same(outcome(call), on_reference(call), STATE_NAMES + ("out",), bits_equal)


def _fp32_close(K):
    def compare(y, ref):
        assert y.shape == ref.shape and y.dtype == ref.dtype
        if y.device.type == "meta" or y.numel() == 0:
            return
        # both are fp32 sums of the same products: (K+2)u of the magnitude, taken here from
        # the reference result's size and the operands' (a generous but finite bound)
        err = (y.double() - ref.double()).abs()
        scale = ref.double().abs() + 1.0
        tol = (K + 2) * EPS32 * scale * 64 + (2.0**-8 if y.dtype != torch.float32 else 0) * scale
        assert bool((err <= tol).all()), f"max error {err.max().item():.3g}"
    return compare


def _weight(N, K, double_quant=False):
    packed, state = qk.quantize_4bit(torch.randn(N, K), "nf4", 64, double_quant)
    return packed, state, (N, K)


@fuzz(examples=[
    # a 3-entry bias on 64 outputs was read past its end
    dict(w=_weight(64, 128), lead=[3], dtype=torch.float32, bias_len=3, layout="contiguous", compute="fp32",
         grad=False, prepared=False),
    # one output, one row: the stride-0 gradient was refused
    dict(w=_weight(1, 64), lead=[1], dtype=torch.float32, bias_len=None, layout="contiguous", compute="fp32",
         grad=True, prepared=False)],
      w=weights(), lead=st.lists(st.sampled_from([0, 1, 2, 5]), min_size=1, max_size=2), dtype=FLOATS,
       bias_len=st.sampled_from([None, "N", 0, 1, 3]), layout=LAYOUTS, compute=st.sampled_from(["fp32", "int8"]),
       grad=st.booleans(), prepared=st.booleans())
def test_linear_4bit_fuzz(w, lead, dtype, bias_len, layout, compute, grad, prepared, where):
    """linear_4bit (fp32 and int8 compute) over weights, x layouts, bias lengths, with and
    without autograd, on (packed, state) and on a prepared weight (prepare_4bit, which
    then meets the tampered states)."""
    packed, state, (N, K) = w
    g = torch.Generator().manual_seed(N * 1000 + K + len(lead))
    x = laid_out(torch.randn(*lead, K, generator=g).to(dtype), layout)
    b = None if bias_len is None else torch.randn(N if bias_len == "N" else bias_len, generator=g)

    def call():
        xx = x.detach().clone().requires_grad_(grad) if x.numel() else x
        if prepared:
            y = qk.linear_4bit(xx, qk.prepare_4bit(packed, state), None, b, compute=compute)
        else:
            y = qk.linear_4bit(xx, packed, state, b, compute=compute)
        if grad and xx.requires_grad:
            y.float().sum().backward()
            return y.detach(), xx.grad
        return y, None

    def compare(a, r):
        if compute == "int8" and a[0].numel() and a[0].dtype == torch.float32:
            plain = formats.QuantState(**{**state.__dict__, "absmax": qk.functional.absmax_fp32(state),
                                          "state2": None, "offset": None})
            bound = (K / 8 + 3) * EPS32 * magnitude(x.reshape(-1, K).float(), packed, plain).reshape(a[0].shape)
            bound += 2 * EPS32 * r[0].double().abs()  # the bias add
            err = (a[0].double() - r[0].double()).abs()
            assert bool((err <= bound + 1e-30).all())
        else:
            _fp32_close(K)(a[0], r[0])
        if a[1] is not None:
            _fp32_close(N)(a[1], r[1])

    check_same(outcome(call), on_reference(call), STATE_NAMES + ("bias", "compute"), compare)


@fuzz(w=weights(), M=st.sampled_from([0, 1, 3]), r=st.sampled_from([0, 1, 4]), bad=st.sampled_from(
    [None, "A_cols", "B_rows", "B_rank", "A_3d", "scaling_nan", "A_int"]), dropout=st.sampled_from([0.0, 0.1]))
def test_lora_linear_4bit_fuzz(w, M, r, bad, dropout, where):
    """lora_linear_4bit over weights, ranks (0 included), mis-shaped factors and scalings."""
    packed, state, (N, K) = w
    g = torch.Generator().manual_seed(M * 31 + r)
    x = torch.randn(M, K, generator=g)
    A, B = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    scaling = 2.0
    if bad == "A_cols":
        A = torch.randn(r, K + 1)
    elif bad == "B_rows":
        B = torch.randn(N + 1, r)
    elif bad == "B_rank":
        B = torch.randn(N, r + 1)
    elif bad == "A_3d":
        A = A[None]
    elif bad == "scaling_nan":
        scaling = float("nan")
    elif bad == "A_int":
        A = A.to(torch.int32)

    def call():
        torch.manual_seed(0)  # the same dropout mask on both backends
        xx, AA, BB = (t.clone().requires_grad_(t.is_floating_point()) for t in (x, A, B))
        y = qk.lora_linear_4bit(xx, packed, state, AA, BB, scaling, dropout_p=dropout, training=True)
        y.sum().backward()
        return y.detach(), xx.grad, AA.grad, BB.grad

    def compare(a, b):
        for u, v, k in zip(a, b, (K, N, M, M)):
            _fp32_close(max(k, 1) * max(r, 1) + K)(u, v)

    check_same(outcome(call), on_reference(call), ("lora_A", "lora_B", "scaling", "rank") + STATE_NAMES, compare)


@fuzz(M=st.sampled_from([0, 1, 5]), K=st.sampled_from([1, 7, 64]), N=st.sampled_from([1, 9]),
       r=st.sampled_from([1, 3]), wdtype=ANY_DTYPE, bias_len=st.sampled_from([None, "N", 2]))
def test_lora_linear_dense_fuzz(M, K, N, r, wdtype, bias_len, where):
    """lora_linear (dense base) over shapes, weight dtypes and bias lengths."""
    g = torch.Generator().manual_seed(M + 10 * K + 100 * N)
    x, A, B = torch.randn(M, K, generator=g), torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    W = torch.randn(N, K, generator=g).to(wdtype) if wdtype.is_floating_point else torch.ones(N, K, dtype=wdtype)
    b = None if bias_len is None else torch.randn(N if bias_len == "N" else bias_len)

    def call():
        return qk.lora_linear(x, W, A, B, 0.5, b)

    check_same(outcome(call), on_reference(call), ("x", "weight", "bias", "lora_A", "lora_B"), _fp32_close(K + r))


@fuzz(M=st.sampled_from([0, 1, 7]), K=st.sampled_from([0, 1, 33]), V=st.sampled_from([0, 1, 50]),
       label=st.sampled_from(["ok", "ignore", "negative", "too_big", "float"]), bias=st.booleans(),
       wdtype=FLOATS, meta=st.sampled_from([None, "weight", "bias", "labels"]))
def test_linear_cross_entropy_fuzz(M, K, V, label, bias, wdtype, meta, where):
    """linear_cross_entropy over empty sizes, label values, dtypes and devices."""
    g = torch.Generator().manual_seed(M + K + V)
    x, W = torch.randn(M, K, generator=g), torch.randn(V, K, generator=g).to(wdtype)
    labels = torch.randint(0, max(V, 1), (M,), generator=g)
    if label == "ignore":
        labels[:] = -100
    elif label == "negative" and M:
        labels[0] = -3
    elif label == "too_big" and M:
        labels[0] = V
    elif label == "float":
        labels = labels.float()
    b = torch.randn(V, generator=g) if bias else None
    args = {"weight": W, "bias": b, "labels": labels}
    if meta and args[meta] is not None:
        args[meta] = args[meta].to("meta")

    def call():
        xx = x.clone().requires_grad_()
        loss = qk.linear_cross_entropy(xx, args["weight"], args["labels"], args["bias"])
        if loss.requires_grad:
            loss.backward()
        return loss.detach(), xx.grad

    def compare(a, r):
        for u, v in zip(a, r):
            if u is None or v is None:
                assert u is None and v is None
                continue
            assert u.shape == v.shape
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, equal_nan=True)

    check_same(outcome(call), on_reference(call), ("x", "weight", "bias", "labels"), compare)


@fuzz(n=st.sampled_from([0, 1, 255, 256, 257, 1000]), bs=st.sampled_from([0, 1, 64, 256, -4]),
       code_len=st.sampled_from([256, 255, 16, 0]), absmax_delta=st.sampled_from([0, 0, 1, -1]),
       meta=st.booleans())
def test_blockwise_8bit_fuzz(n, bs, code_len, absmax_delta, meta, where):
    """The 8-bit blockwise ops (the double-quantization codec) with wrong maps and sizes."""
    code = formats.dynamic_map()[:code_len] if code_len <= 256 else torch.zeros(code_len)
    A = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1
    ops = torch.ops.qlora_kernels

    def call():
        q, absmax = ops.quantize_blockwise_8bit(A, code, bs)
        if absmax_delta:
            absmax = absmax[:-1] if absmax_delta < 0 and absmax.numel() else torch.cat([absmax, absmax[:1] + 1])
        if meta:
            absmax = absmax.to("meta")
        return q, ops.dequantize_blockwise_8bit(q, absmax, code, bs)

    check_same(outcome(call), on_reference(call), ("code", "blocksize", "absmax", "same device"),
               lambda a, b: (bits_equal(a[0], b[0]), bits_equal(a[1], b[1])))


@fuzz(w=weights(), fmt=st.sampled_from(["packed", "plain"]), drop=st.sampled_from([None, "absmax", "quant_map",
                                                                                      "shape", "dtype"]),
       junk=st.sampled_from([None, ("dtype", "float64"), ("blocksize", 0), ("nested_blocksize", 0),
                             ("shape", [2**40, 128]), ("quant_type", "fp8"), ("nested_dtype", "x")]))
def test_quant_state_from_dict_fuzz(w, fmt, drop, junk, where):
    """QuantState.from_dict over dropped keys and junk values: a complete, consistent state
    or a ValueError naming the key."""
    packed, state, _ = w
    try:
        d = state.as_dict(packed=fmt == "packed")
    except (ValueError, TypeError, AttributeError, RuntimeError):
        return  # a state tampered beyond serialization (the weights strategy's doing)
    if fmt == "plain":
        if drop:
            d.pop(drop, None)
        if junk and (junk[0] != "nested_blocksize" or state.nested) and (junk[0] != "nested_dtype" or state.nested):
            d[junk[0]] = junk[1]
    try:
        s = formats.QuantState.from_dict(d)
    except ValueError as e:
        assert "quant_state" in str(e)
        return
    s.validate()
    if s.absmax.device.type == "cpu" and packed.numel() == formats.packed_numel(s.numel):
        outcome(lambda: qk.dequantize_4bit(packed, s))  # valid or a clear error; never a crash


@fuzz(B=st.sampled_from([0, 1, 2]), H=st.sampled_from([1, 3, 4]), Hk=st.sampled_from([1, 2, 3]),
      S=st.sampled_from([0, 1, 5, 64, 67]), D=st.sampled_from([0, 1, 7, 16, 33]),
      layout=st.sampled_from(["contiguous", "transposed", "expanded_kv", "sliced"]),
      dtype=FLOATS, scale=st.sampled_from([None, 0.3, -1.0, 0.0]), meta=st.sampled_from([None, "q", "v"]))
def test_causal_attention_fuzz(B, H, Hk, S, D, layout, dtype, scale, meta, where):
    """causal_attention forward and backward over empty and odd sizes, head counts that do
    and do not group, strided views (transformers' transposed q, k/v expanded with stride 0,
    sliced head size), dtypes, bad scales and meta tensors."""
    g = torch.Generator().manual_seed(B * 1000 + H * 100 + S * 10 + D)
    if layout == "transposed":
        q = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
    elif layout == "sliced":
        q = torch.randn(B, H, S, D + 3, generator=g)[..., 1:D + 1]
    else:
        q = torch.randn(B, H, S, D, generator=g)
    if layout == "expanded_kv":
        k = torch.randn(1, Hk, S, D, generator=g).expand(B, Hk, S, D)
        v = torch.randn(1, Hk, S, D, generator=g).expand(B, Hk, S, D)
    else:
        k, v = torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D, generator=g)
    args = {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype)}
    if meta:
        args[meta] = args[meta].to("meta")

    def call():
        ts = {n: t.detach().clone().requires_grad_() if t.device.type == "cpu" else t for n, t in args.items()}
        out = qk.causal_attention(ts["q"], ts["k"], ts["v"], scale)
        out.float().square().sum().backward()
        return (out.detach(), *(ts[n].grad for n in ("q", "k", "v")))

    def compare(a, r):
        for u, w in zip(a, r):
            assert u.shape == w.shape and u.dtype == w.dtype
            tol = 1e-5 if u.dtype == torch.float32 else 2e-2
            # gradients that are zero in exact arithmetic (one position: softmax 1, dp - delta
            # = 0) come out as the rounding of two D-term dot products summed in other orders
            atol = tol * max(D, 1) * (1 + w.float().abs().max().item())
            torch.testing.assert_close(u.float(), w.float(), rtol=tol, atol=atol)

    check_same(outcome(call), on_reference(call), ("q", "k", "v", "scale"), compare)
