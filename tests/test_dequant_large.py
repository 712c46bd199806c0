"""Outputs past 32 MiB take the non-temporal-store branch of the SIMD dequantizers (and an
output that is not 64-byte aligned the plain-store branch): every CPU path, every output
dtype, against the reference backend bit for bit."""
import pytest
import torch

import qlora_kernels as qk

from .conftest import kernel_paths, on_path

ROWS, COLS = 2049, 4100  # 8.4 M elements (33.6 MB as fp32), rows not whole blocks


@pytest.fixture(scope="module")
def weight():
    W = torch.randn(ROWS, COLS)
    packed, state = qk.quantize_4bit(W, "nf4", 64)
    with qk.use_backend("reference"):
        ref = {dt: qk.dequantize_4bit(packed, state, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    return packed, state, ref


@pytest.mark.parametrize("isa", kernel_paths())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_output_every_path(weight, isa, dtype):
    packed, state, ref = weight
    with on_path("cpu", isa):
        assert torch.equal(qk.dequantize_4bit(packed, state, dtype=dtype), ref[dtype])


@pytest.mark.parametrize("isa", kernel_paths())
@pytest.mark.parametrize("offset", [1, 16])  # 4 bytes: unaligned; 64 bytes: aligned
def test_large_output_into_offset_buffer(weight, isa, offset):
    packed, state, ref = weight
    buf = torch.full((ROWS * COLS + offset + 3,), 7.0)
    out = buf[offset:offset + ROWS * COLS].view(ROWS, COLS)
    with on_path("cpu", isa):
        qk.dequantize_4bit(packed, state, out=out)
    assert torch.equal(out, ref[torch.float32])
    assert (buf[:offset] == 7).all() and (buf[offset + ROWS * COLS:] == 7).all()  # nothing written outside
