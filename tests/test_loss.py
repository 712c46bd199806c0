"""The dense fp32 linear kernels and the fused output head + cross-entropy
(linear_cross_entropy), on every backend path, against torch's unfused loss."""
import pytest
import torch
import torch.nn.functional as F

import qlora_kernels as qk
from qlora_kernels import _C
from qlora_kernels.ops import loss as ops_loss
from qlora_kernels.backends import run

# (rows, hidden, vocab): one element, odd sizes, a vocabulary past 4096 and not a multiple
# of any micro-tile, more rows than one chunk.
SHAPES = [(1, 1, 1), (7, 13, 50), (33, 70, 4097), (300, 64, 1000)]


def _fp64_linear(x, W, b=None):
    y = x.double() @ W.double().t()
    return y if b is None else y + b.double()


# up to 4 rows the forward is the streaming GEMV (dense_pack.h), above it the packed GEMM
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 13, 5), (130, 1030, 4097), (5, 64, 300), (0, 3, 4), (3, 0, 5),
                                   (1, 577, 4099), (4, 70, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_kernels_match_fp64(path, M, K, N, bias):
    x, W, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
    b = torch.randn(N) if bias else None
    with qk.use_backend(path[0]):
        y = run("linear_dense", x, W, b)
        dx = run("linear_dense_grad_input", dy, W)
    assert y.shape == (M, N) and dx.shape == (M, K)
    # fp32 accumulation: |err| <= (K+2) 2^-24 (|x| @ |W|.T) elementwise (dense.h)
    bound_y = (K + 2) * 2.0 ** -24 * (x.abs().double() @ W.abs().double().t()) + 1e-30
    bound_dx = (N + 2) * 2.0 ** -24 * (dy.abs().double() @ W.abs().double()) + 1e-30
    ref_y = _fp64_linear(x, W, b)
    if b is not None:
        bound_y = bound_y + 2.0 ** -24 * ref_y.abs()
    assert ((y.double() - ref_y).abs() <= bound_y).all()
    assert ((dx.double() - dy.double() @ W.double()).abs() <= bound_dx).all()


@pytest.mark.parametrize("bias", [False, True])
def test_dense_kernels_write_into_out(path, bias):
    """out= (the fused loss's one logits buffer) gives the bits of a fresh result, in out's
    own storage; a wrong out is refused naming it."""
    x, W, dy = torch.randn(9, 70), torch.randn(4097, 70), torch.randn(9, 4097)
    b = torch.randn(4097) if bias else None
    with qk.use_backend(path[0]):
        y, dx = run("linear_dense", x, W, b), run("linear_dense_grad_input", dy, W)
        buf, dbuf = torch.full((12, 4097), float("nan")), torch.full((12, 70), float("nan"))
        y2 = run("linear_dense", x, W, b, buf[:9])
        dx2 = run("linear_dense_grad_input", dy, W, dbuf[2:11])
        assert y2.data_ptr() == buf.data_ptr() and dx2.data_ptr() == dbuf[2:].data_ptr()
        assert torch.equal(y2, y) and torch.equal(dx2, dx)
        assert buf[9:].isnan().all() and dbuf[:2].isnan().all() and dbuf[11:].isnan().all()
        for bad in (torch.empty(9, 4096), torch.empty(9, 4097, dtype=torch.float64), torch.empty(4097, 9).t()):
            with pytest.raises(ValueError, match="out must be a contiguous float32 tensor of shape \\(9, 4097\\)"):
                run("linear_dense", x, W, b, bad)
        with pytest.raises(ValueError, match="out must be"):
            run("linear_dense_grad_input", dy, W, torch.empty(9, 71))


def test_loss_chunks_share_one_logits_buffer(monkeypatch):
    """Every chunk's logits go to one buffer and every chunk's input gradient straight into
    the result: no per-chunk [rows, vocab] allocation (each was thousands of page faults)."""
    outs = []
    real = ops_loss.run

    def spy(name, *args):
        if name in ("linear_dense", "linear_dense_grad_input"):
            outs.append((name, args[-1].data_ptr(), args[-1].shape[0]))
        return real(name, *args)

    monkeypatch.setattr(ops_loss, "chunk_rows", lambda vocab: 17)
    monkeypatch.setattr(ops_loss, "run", spy)
    x, W, b, labels = _leaves(40, 24, 97, True)
    loss = qk.linear_cross_entropy(x, W, labels, bias=b)
    loss.backward()
    fwd = [o for o in outs if o[0] == "linear_dense"]
    assert [o[2] for o in fwd] == [14, 14, 12] and len({o[1] for o in fwd}) == 1
    gi = [o for o in outs if o[0] == "linear_dense_grad_input"]
    assert [o[1] - gi[0][1] for o in gi] == [0, 14 * 24 * 4, 28 * 24 * 4]
    x2 = x.detach().clone().requires_grad_()
    monkeypatch.setattr(ops_loss, "run", real)
    _ref_loss(x2, W.detach(), labels, b.detach(), reduction="mean").backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_dense_native_strided_and_checked():
    x = torch.randn(9, 40)[:, :33]  # row stride 40
    W = torch.randn(70, 48)[:, :33]
    y = torch.empty(9, 70)
    _C.dense_forward(x.data_ptr(), 9, 33, 40, W.data_ptr(), 70, 48, 0, 0, y.data_ptr(), 70, 2)
    assert torch.allclose(y, x @ W.t(), atol=1e-4)
    with pytest.raises(ValueError, match="ldw"):
        _C.dense_forward(x.data_ptr(), 9, 33, 40, W.data_ptr(), 70, 20, 0, 0, y.data_ptr(), 70, 2)
    with pytest.raises(ValueError, match="ldy"):
        _C.dense_forward(x.data_ptr(), 9, 33, 40, W.data_ptr(), 70, 48, 0, 0, y.data_ptr(), 10, 2)
    with pytest.raises(ValueError, match="y must not overlap x"):
        _C.dense_forward(x.data_ptr(), 9, 33, 40, W.data_ptr(), 70, 48, 0, 0, x.data_ptr(), 70, 2)
    with pytest.raises(ValueError, match="null"):
        _C.dense_backward_input(0, 9, 70, 70, W.data_ptr(), 33, 48, y.data_ptr(), 33, 2)


def _ref_loss(x, W, labels, b=None, ignore_index=-100, reduction="mean"):
    return F.cross_entropy(F.linear(x, W, b).float(), labels, ignore_index=ignore_index, reduction=reduction)


def _leaves(M, K, V, bias, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 2).to(dtype).requires_grad_()
    W = (torch.randn(V, K, generator=g) / K ** 0.5).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    labels = torch.randint(0, V, (M,), generator=g)
    labels[1::3] = -100
    return x, W, b, labels


def _grads(loss, leaves):
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


@pytest.mark.parametrize("M,K,V", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_torch(path, M, K, V, bias, reduction):
    x, W, b, labels = _leaves(M, K, V, bias)
    if M == 1:
        labels[0] = 0  # one labelled row: the mean is defined
    want = _ref_loss(x, W, labels, b, reduction=reduction)
    with qk.use_backend(path[0]):
        got = qk.linear_cross_entropy(x, W, labels, bias=b, reduction=reduction)
        g_got = _grads(got, (x, W, b))
    g_want = _grads(want, (x, W, b))
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_chunking_is_invisible(monkeypatch):
    """Rows split over many chunks (chunk smaller than M, M not a multiple of it) give the
    same loss and gradients as one chunk."""
    x, W, b, labels = _leaves(301, 24, 97, True)
    monkeypatch.setattr(ops_loss, "chunk_rows", lambda vocab: 301)
    one = qk.linear_cross_entropy(x, W, labels, bias=b)
    g_one = _grads(one, (x, W, b))
    monkeypatch.setattr(ops_loss, "chunk_rows", lambda vocab: 17)
    many = qk.linear_cross_entropy(x, W, labels, bias=b)
    g_many = _grads(many, (x, W, b))
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)
    for a, e in zip(g_many, g_one):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def test_chunks_are_equal(monkeypatch):
    """The rows split into as few chunks as chunk_rows allows, of near-equal size (no short
    last chunk, which would stream the whole weight again for a few rows)."""
    assert [ops_loss.row_step(m, 49152) for m in (1, 170, 171, 512, 1024)] == [170, 170, 86, 128, 147]
    sizes = []
    real = ops_loss.run

    def spy(name, *args):
        if name == "linear_dense":
            sizes.append(args[0].shape[0])
        return real(name, *args)

    monkeypatch.setattr(ops_loss, "chunk_rows", lambda vocab: 17)
    monkeypatch.setattr(ops_loss, "run", spy)
    x, W, b, labels = _leaves(301, 24, 97, True)
    qk.linear_cross_entropy(x, W, labels, bias=b)
    assert sizes == [17] * 17 + [12]
    sizes.clear()
    qk.linear_cross_entropy(x[:35], W, labels[:35], bias=b)
    assert sizes == [12, 12, 11]


def test_frozen_weight_gets_no_gradient_work_and_3d_input():
    x, W, _, labels = _leaves(24, 16, 40, False)
    W.requires_grad_(False)
    x3, l3 = x.detach().reshape(2, 12, 16).requires_grad_(), labels.reshape(2, 12)
    got = qk.linear_cross_entropy(x3, W, l3, num_items_in_batch=7)
    want = _ref_loss(x3.reshape(-1, 16), W, l3.reshape(-1), reduction="sum") / 7
    torch.testing.assert_close(got, want)
    (gx,) = torch.autograd.grad(got, [x3])
    assert gx.shape == x3.shape
    # the op computed no weight gradient it was not asked for
    out = torch.ops.qlora_kernels.linear_cross_entropy(x3, W, None, l3, -100, True, False, False)
    assert out[2].numel() == 0 and out[3].numel() == 0


def test_bf16_input_is_widened_and_no_grad_computes_no_gradients():
    x, W, _, labels = _leaves(20, 32, 64, False, dtype=torch.bfloat16)
    got = qk.linear_cross_entropy(x, W, labels)
    want = _ref_loss(x.float(), W, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(got, [x])
    assert gx.dtype == torch.bfloat16
    with torch.no_grad():
        out = torch.ops.qlora_kernels.linear_cross_entropy(x, W, None, labels, -100, False, False, False)
    assert all(t.numel() == 0 for t in out[1:])


def test_all_rows_ignored_gives_nan_mean_like_torch():
    x, W, _, labels = _leaves(5, 8, 10, False)
    labels[:] = -100
    assert torch.isnan(qk.linear_cross_entropy(x, W, labels)) and torch.isnan(_ref_loss(x, W, labels))
    assert qk.linear_cross_entropy(x, W, labels, reduction="sum") == 0


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_linear_cross_entropy(path, bias):
    x, W, b, labels = _leaves(9, 12, 30, bias)
    with qk.use_backend(path[0]):
        torch.library.opcheck(torch.ops.qlora_kernels.linear_cross_entropy.default,
                              (x, W, b, labels, -100, True, True, bias))


def test_linear_cross_entropy_under_torch_compile():
    x, W, b, labels = _leaves(16, 12, 30, True)
    eager = qk.linear_cross_entropy(x, W, labels, bias=b)
    compiled = torch.compile(lambda *a: qk.linear_cross_entropy(a[0], a[1], a[2], bias=a[3]), fullgraph=True)
    got = compiled(x, W, labels, b)
    torch.testing.assert_close(got, eager)
    for a, e in zip(_grads(got, (x, W, b)), _grads(eager, (x, W, b))):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("case,exc,match", [
    ("label_range", ValueError, r"labels\[2\] = 30 is outside \[0, 30\)"),
    ("negative_label", ValueError, r"labels\[0\] = -1 is outside"),
    ("label_shape", ValueError, "labels has shape"),
    ("label_dtype", TypeError, "labels must be an int64"),
    ("x_dtype", TypeError, "x must be float32"),
    ("x_width", ValueError, "x's last dimension must be 12"),
    ("weight_dim", ValueError, "weight must be 2-D"),
    ("bias_shape", ValueError, "bias has shape"),
    ("reduction", ValueError, "reduction must be 'mean' or 'sum'"),
])
def test_linear_cross_entropy_bad_input(case, exc, match):
    x, W, b, labels = _leaves(6, 12, 30, True)
    kw = {"bias": b}
    if case == "label_range":
        labels[2] = 30
    elif case == "negative_label":
        labels[0] = -1
    elif case == "label_shape":
        labels = labels[:5]
    elif case == "label_dtype":
        labels = labels.float()
    elif case == "x_dtype":
        x = x.detach().double()
    elif case == "x_width":
        x = torch.randn(6, 11)
    elif case == "weight_dim":
        W = W.detach().reshape(-1)
    elif case == "bias_shape":
        kw["bias"] = torch.randn(29)
    elif case == "reduction":
        kw["reduction"] = "none"
    with pytest.raises(exc, match=match):
        qk.linear_cross_entropy(x, W, labels, **kw)


@pytest.mark.parametrize("M,V", [(1, 1), (3, 7), (5, 4097), (2, 50000)])
def test_softmax_xent_row_pass_matches_torch(path, M, V):
    """The fused loss's row pass (csrc/norm_act.h on the cpu paths): per-row loss and the
    gradient softmax - onehot written over the logits, ignored rows zeroed, against fp64 torch;
    large logits (the max is subtracted first) and a -inf logit."""
    g = torch.Generator().manual_seed(M * 7 + V)
    z = torch.randn(M, V, generator=g) * 30 + 1000
    z[0, 0] = float("-inf") if V > 1 else z[0, 0]
    labels = torch.randint(0, V, (M,), generator=g)
    labels[0] = V - 1
    if M > 2:
        labels[1] = -1
    valid = labels >= 0
    z64 = z.double()
    logp = torch.log_softmax(z64, 1)
    want_loss = torch.where(valid, -logp.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1), 0.0)
    want_g = logp.exp()
    want_g[valid, labels[valid]] -= 1
    want_g[~valid] = 0
    got_g = z.clone()
    got_loss = run("softmax_xent", got_g, labels)
    # |loss| error: the logsumexp's ~V/2 u of summation and the exp's ulp, relative to the
    # row's largest shifted logit (~100 here); gradient entries within 8u of 1
    assert torch.all((got_loss.double() - want_loss).abs() <= 1e-6 * (1 + want_loss.abs()) + V * 2 ** -24 * 200)
    assert torch.all((got_g.double() - want_g).abs() <= (V / 2 + 16) * 2 ** -24 * (want_g.abs() + 1e-7) + 1e-7)
    assert torch.all(got_g[~valid] == 0)
