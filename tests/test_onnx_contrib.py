"""The layout facts the ONNX export rests on, checked in ONNX Runtime itself: one
MatMulBnb4 node on our packed bytes and absmax equals our linear_4bit; ORT's own NF4
quantizer writes the very bytes we write; one MatMulNBits node on our int4 encoding equals
the torch op the exported model runs."""
import numpy as np
import pytest
import torch
from onnx import numpy_helper

from qlora_kernels import functional
from qlora_kernels.integrations.onnx import contrib

# fp32 sums of K products in a different order: ORT dequantizes then runs SGEMM.
MATMUL_ATOL = 2e-5


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("N,K,blocksize,double_quant", [(96, 128, 64, False), (33, 64, 64, True),
                                                          (40, 256, 128, True), (7, 192, 64, False)])
def test_matmulbnb4_node_equals_linear_4bit(quant_type, N, K, blocksize, double_quant):
    torch.manual_seed(N + K)
    W, x = torch.randn(N, K) * 0.05, torch.randn(5, K)
    packed, state = functional.quantize_4bit(W, quant_type, blocksize, double_quant)
    absmax = functional.absmax_fp32(state)  # double-quantized absmax, expanded as MatMulBnb4 needs
    sess = contrib.session(contrib.bnb4_model(packed, absmax, K, N, blocksize, quant_type))
    got = torch.from_numpy(sess.run(None, {"X": x.numpy()})[0])
    ref = functional.linear_4bit(x, packed, state)
    assert got.shape == (5, N)
    assert (got - ref).abs().max() <= MATMUL_ATOL


def test_matmulbnb4_wrong_quant_type_differs():
    # The attribute really selects the codebook: NF4 bytes read as FP4 give another product.
    torch.manual_seed(0)
    W, x = torch.randn(32, 64), torch.randn(3, 64)
    packed, state = functional.quantize_4bit(W, "nf4", 64)
    sess = contrib.session(contrib.bnb4_model(packed, state.absmax, 64, 32, 64, "fp4"))
    got = torch.from_numpy(sess.run(None, {"X": x.numpy()})[0])
    assert (got - functional.linear_4bit(x, packed, state)).abs().max() > 0.1


def test_ort_nf4_quantizer_writes_our_bytes():
    torch.manual_seed(1)
    W = torch.randn(48, 128)
    model = contrib.ort_quantized_model(W, "bnb4")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    packed_ort = next(v for v in inits.values() if v.dtype == np.uint8)
    absmax_ort = next(v for v in inits.values() if v.dtype == np.float32)
    packed, state = functional.quantize_4bit(W, "nf4", 64)
    assert np.array_equal(packed_ort.reshape(-1), packed.reshape(-1).numpy())
    assert np.array_equal(absmax_ort.reshape(-1), state.absmax.numpy())


@pytest.mark.parametrize("N,K", [(96, 128), (5, 100)])
def test_matmulnbits_node_equals_torch_op(N, K):
    torch.manual_seed(K)
    W, x = torch.randn(N, K) * 0.05, torch.randn(4, K)
    B, scales = contrib.quantize_nbits(W)
    assert B.shape == (N, -(-K // 64), 32) and scales.shape == (N, -(-K // 64))
    sess = contrib.session(contrib.nbits_model(B, scales, K, N))
    got = torch.from_numpy(sess.run(None, {"X": x.numpy()})[0])
    from qlora_kernels.integrations.onnx import ops  # noqa: F401  registers the op

    ref = torch.ops.qlora_kernels_onnx.matmul_nbits(x, B, scales, K, N, 64)
    assert (got - ref).abs().max() <= MATMUL_ATOL
    # The encoding's own error: at most half a step, absmax / 14 per block.
    Wd = contrib.dequantize_nbits(B, scales, K)
    step = scales.repeat_interleave(64, dim=1)[:, :K]
    assert ((W - Wd).abs() <= step / 2 + 1e-7).all()
