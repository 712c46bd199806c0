"""The torch.library declarations: schemas, fake implementations, opcheck, compile."""
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import formats


def _dq_args(shape=(33, 70), blocksize=64, quant_type="nf4", dtype=torch.float32):
    packed, state = qk.quantize_4bit(torch.randn(shape), quant_type, blocksize)
    return (packed, state.absmax, blocksize, quant_type, list(shape), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 70), (4097,)])
def test_opcheck_quantize_and_dequantize(path, dtype, shape):
    W = torch.randn(shape).to(dtype)
    torch.library.opcheck(torch.ops.qlora_kernels.quantize_4bit.default, (W, 64, "nf4"))
    torch.library.opcheck(torch.ops.qlora_kernels.dequantize_4bit.default, _dq_args(shape, 64, "fp4", dtype))
    packed, absmax, *_ = _dq_args(shape)
    out = torch.empty(shape, dtype=dtype)
    torch.library.opcheck(torch.ops.qlora_kernels.dequantize_4bit_out.default, (packed, absmax, 64, "nf4", out))


def test_opcheck_blockwise_8bit(path):
    x = torch.randn(1000)
    code = formats.dynamic_map()
    torch.library.opcheck(torch.ops.qlora_kernels.quantize_blockwise_8bit.default, (x, code, 256))
    q, a = torch.ops.qlora_kernels.quantize_blockwise_8bit(x, code, 256)
    torch.library.opcheck(torch.ops.qlora_kernels.dequantize_blockwise_8bit.default, (q, a, code, 256))


def test_fake_tensors_give_shapes_without_running_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        W = torch.empty(4096, 4097)
        packed, absmax = torch.ops.qlora_kernels.quantize_4bit(W, 64, "nf4")
        assert packed.shape == ((4096 * 4097 + 1) // 2, 1) and absmax.shape == (-(-4096 * 4097 // 64),)
        out = torch.ops.qlora_kernels.dequantize_4bit(packed, absmax, 64, "nf4", [4096, 4097], torch.bfloat16)
        assert out.shape == (4096, 4097) and out.dtype == torch.bfloat16


def test_dequantize_under_torch_compile(path):
    packed, absmax, bs, qt, shape, dtype = _dq_args()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(p, a):
        return torch.ops.qlora_kernels.dequantize_4bit(p, a, bs, qt, shape, dtype) * 2

    assert torch.equal(f(packed, absmax), 2 * torch.ops.qlora_kernels.dequantize_4bit(packed, absmax, bs, qt, shape, dtype))
