"""Bad input gets a clear exception naming the argument, on every backend and path."""
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _C, formats


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.float64, torch.bool], ids=str)
def test_quantize_rejects_unsupported_dtypes(path, dtype):
    with pytest.raises(TypeError, match="W must be float32, bfloat16 or float16"):
        qk.quantize_4bit(torch.zeros(64, dtype=dtype))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 63, 8192, -64, 64.0, True])
def test_quantize_rejects_unsupported_blocksizes(path, blocksize):
    with pytest.raises((ValueError, TypeError), match="blocksize"):
        qk.quantize_4bit(torch.randn(128), blocksize=blocksize)


def test_quantize_rejects_unknown_quant_type(path):
    with pytest.raises(ValueError, match="quant_type"):
        qk.quantize_4bit(torch.randn(64), quant_type="int4")


def test_quantize_rejects_non_tensors():
    with pytest.raises(TypeError, match="W must be a torch.Tensor"):
        qk.quantize_4bit([1.0, 2.0])
    with pytest.raises(TypeError, match="double_quant"):
        qk.quantize_4bit(torch.randn(64), double_quant=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_non_finite_weights_are_rejected_with_their_block(path, bad, dtype):
    W = torch.randn(5, 64).to(dtype)
    W[3, 10] = bad
    with pytest.raises(ValueError, match=r"W contains NaN or Inf \(first in block 3"):
        qk.quantize_4bit(W, "nf4", 64)
    W2 = torch.randn(10).to(dtype)  # tail block only
    W2[-1] = bad
    with pytest.raises(ValueError, match="first in block 0"):
        qk.quantize_4bit(W2, "fp4", 64)


def test_packed_that_does_not_belong_to_the_state(path):
    packed, state = qk.quantize_4bit(torch.randn(64, 64))
    with pytest.raises(ValueError, match="packed has 2047 bytes"):
        qk.dequantize_4bit(packed[:-1], state)
    other_packed, _ = qk.quantize_4bit(torch.randn(32, 64))
    with pytest.raises(ValueError, match="does not belong to this state"):
        qk.dequantize_4bit(other_packed, state)


def test_state_inconsistencies_name_the_field(path):
    packed, state = qk.quantize_4bit(torch.randn(64, 64))
    broken = formats.QuantState(**{**state.__dict__, "absmax": state.absmax[:-1]})
    with pytest.raises(ValueError, match="state.absmax has 63 entries"):
        qk.dequantize_4bit(packed, broken)
    for field, value, exc, words in [
        ("blocksize", 48, ValueError, "state.blocksize"),
        ("quant_type", "int4", ValueError, "state.quant_type"),
        ("code", formats.codebook("fp4"), ValueError, "state.code"),
        ("absmax", state.absmax.double(), TypeError, "state.absmax must be float32"),
        ("shape", None, ValueError, "state.shape"),
    ]:
        with pytest.raises(exc, match=words):
            qk.dequantize_4bit(packed, formats.QuantState(**{**state.__dict__, field: value}))
    with pytest.raises(TypeError, match="state must be a qlora_kernels.QuantState"):
        qk.dequantize_4bit(packed, {"absmax": state.absmax})


def test_dequantize_rejects_bad_packed_and_dtype(path):
    packed, state = qk.quantize_4bit(torch.randn(64))
    with pytest.raises(TypeError, match="packed must hold uint8 bytes"):
        qk.dequantize_4bit(packed.to(torch.int32), state)
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16"):
        qk.dequantize_4bit(packed, state, dtype=torch.float64)
    with pytest.raises(ValueError, match="out has shape"):
        qk.dequantize_4bit(packed, state, out=torch.empty(63))
    with pytest.raises(ValueError, match="out must be contiguous"):
        qk.dequantize_4bit(packed, formats.QuantState(**{**state.__dict__, "shape": torch.Size([8, 8])}),
                           out=torch.empty(8, 8).t())


def test_quant_storage_views_are_accepted():
    """bitsandbytes' quant_storage keeps the same bytes in another dtype (for FSDP)."""
    packed, state = qk.quantize_4bit(torch.randn(16, 64))
    as_float = packed.reshape(-1).view(torch.float32)
    assert torch.equal(qk.dequantize_4bit(as_float, state), qk.dequantize_4bit(packed, state))


def test_native_side_checks_sizes_itself():
    """The C++ entry points never trust Python: wrong counts raise, not overflow."""
    code = formats.codebook("nf4")
    packed = torch.zeros(8, dtype=torch.uint8)
    absmax = torch.ones(1)
    out = torch.empty(16)
    with pytest.raises(ValueError, match="packed has 7 bytes"):
        _C.dequantize_4bit(packed.data_ptr(), 7, absmax.data_ptr(), 1, code.data_ptr(), 16, 64, out.data_ptr(), 0, 1)
    with pytest.raises(ValueError, match="absmax has 2 entries"):
        _C.dequantize_4bit(packed.data_ptr(), 8, absmax.data_ptr(), 2, code.data_ptr(), 16, 64, out.data_ptr(), 0, 1)
    with pytest.raises(ValueError, match="blocksize"):
        _C.dequantize_4bit(packed.data_ptr(), 8, absmax.data_ptr(), 1, code.data_ptr(), 16, 63, out.data_ptr(), 0, 1)
    with pytest.raises(ValueError, match="dtype code"):
        _C.dequantize_4bit(packed.data_ptr(), 8, absmax.data_ptr(), 1, code.data_ptr(), 16, 64, out.data_ptr(), 7, 1)
    with pytest.raises(ValueError, match="null data pointer"):
        _C.dequantize_4bit(0, 8, absmax.data_ptr(), 1, code.data_ptr(), 16, 64, out.data_ptr(), 0, 1)


def test_same_bytes():
    """_C.same_bytes (the bitsandbytes plugin's check of its cached nested-absmax decode)."""
    a = torch.arange(37, dtype=torch.uint8)
    b = a.clone()
    assert _C.same_bytes(a.data_ptr(), b.data_ptr(), 37) and _C.same_bytes(0, 0, 0)
    b[36] ^= 1
    assert not _C.same_bytes(a.data_ptr(), b.data_ptr(), 37) and _C.same_bytes(a.data_ptr(), b.data_ptr(), 36)
    with pytest.raises(ValueError, match="null data pointer"):
        _C.same_bytes(0, b.data_ptr(), 1)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        _C.same_bytes(a.data_ptr(), b.data_ptr(), -1)


def test_backend_selection_errors():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        qk.set_backend("gpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with qk.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="unknown ISA path"):
        _C.set_isa("sse9")
