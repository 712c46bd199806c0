"""Shared fixtures: every native path the machine can run, and bitsandbytes as the oracle
for the formats (installed by the dev extra; a missing bitsandbytes fails, never skips)."""
from __future__ import annotations

import contextlib
import logging
import os

# bitsandbytes is these tests' oracle for the formats: with our backend plugin loaded into
# it, "bitsandbytes' bytes" would be ours. The plugin's own tests (test_bnb_plugin.py) run
# it in subprocesses; in this process bitsandbytes keeps its own kernels.
os.environ["QLORA_KERNELS_BNB"] = "0"
# The suite runs the built-in tuning of the CPU kernels, the same on every machine, so that a
# failure reproduces elsewhere; test_tuning.py runs every tuning value and the calibration.
os.environ["QLORA_KERNELS_TUNE"] = "0"

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _C

# bitsandbytes logs a warning about an optional kernels-community package on CPUs with
# AVX512-BF16; it is irrelevant here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def native_paths() -> list[str]:
    """Every CPU path of the extension that this machine runs."""
    return list(_C.supported_isas())


def kernel_paths() -> list[str]:
    """The paths with distinct fp32 kernels: avx512vnni is avx512 plus the int8-compute
    kernels (test_linear_int8 runs those on every path), so where both run, avx512vnni
    stands for both in the fp32 tests."""
    paths = native_paths()
    return [p for p in paths if not (p == "avx512" and "avx512vnni" in paths)]


# (backend, isa) pairs: the reference backend and each CPU path this machine can run.
BACKEND_PATHS = [("reference", None)] + [("cpu", isa) for isa in kernel_paths()]


@contextlib.contextmanager
def on_path(backend: str, isa: str | None):
    previous = _C.get_isa()
    try:
        if isa is not None:
            _C.set_isa(isa)
        with qk.use_backend(backend):
            yield
    finally:
        _C.set_isa(previous)


@pytest.fixture(params=BACKEND_PATHS, ids=lambda p: p[0] if p[1] is None else f"{p[0]}-{p[1]}")
def path(request):
    with on_path(*request.param):
        yield request.param


@pytest.fixture(scope="session")
def bnb():
    import bitsandbytes
    import bitsandbytes.functional  # noqa: F401

    from qlora_kernels.integrations.bitsandbytes import status

    assert not status()["active"], "bitsandbytes, the oracle, must run its own kernels here"
    return bitsandbytes


@contextlib.contextmanager
def no_dynamo():
    """bitsandbytes wraps its pure-torch CPU fallbacks in torch.compile; compiling them
    per test shape costs seconds and changes no result."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, so comparisons see -0.0 vs 0.0 and NaN payloads."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


# ---- bitsandbytes as the oracle: its own pure-torch path, never a guess from the CPU ----
# bitsandbytes' native CPU dequantization has defects that depend on which of its kernels
# this CPU runs (docs/formats.md, "bitsandbytes defects"). No test may decide from the
# CPU's name which one applies: every comparison runs bitsandbytes' native path and its
# pure-torch path on the same input, holds ours to the torch path, and requires each
# disagreement between bitsandbytes' two paths to be one of the documented defects.

def bnb_torch_dequant(bnb, qb: torch.Tensor, sb) -> torch.Tensor:
    """bitsandbytes' own pure-torch 4-bit decode (its `default` backend kernel) of (qb, sb)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute, _get_4bit_code

    absmax = sb.absmax
    if sb.nested:
        absmax = bnb.functional.dequantize_blockwise(sb.absmax, sb.state2) + sb.offset
    with no_dynamo():
        return _dequantize_4bit_compute(qb.reshape(-1), absmax, _get_4bit_code(sb.quant_type, qb.device), sb.blocksize,
                                        sb.shape, sb.dtype)


def bnb_native_defect(native: torch.Tensor, ref: torch.Tensor, blocksize: int) -> str | None:
    """Which documented bitsandbytes defect explains where its native decode `native`
    differs from its torch decode `ref` of the same bytes (None: bit-identical). Fails on
    any difference that no documented defect explains."""
    if native.shape != ref.shape or native.dtype != ref.dtype:
        raise AssertionError(f"bitsandbytes' native decode has {native.shape}/{native.dtype}, "
                             f"its torch path {ref.shape}/{ref.dtype}")
    differ = bits(native) != bits(ref)
    if not bool(differ.any()):
        return None
    a, b = native.reshape(-1)[differ], ref.reshape(-1)[differ]
    if bool(((a == 0) & (b == 0)).all()):
        # the AVX2 kernel writes FP4 code 8 as -0.0 where its torch path writes +0.0
        return "signed-zero"
    # the AVX-512 kernel indexes absmax per row: only rows that are not a whole number
    # of blocks can pick a wrong scale
    assert native.dim() >= 1 and native.shape[-1] % blocksize != 0, (
        f"bitsandbytes' native and torch decodes differ in {int(differ.sum())} values on a shape "
        f"{tuple(native.shape)} whose rows are whole blocks of {blocksize}: not a documented defect")
    return "row-absmax"


def assert_equals_bnb_dequant(bnb, ours: torch.Tensor, qb: torch.Tensor, sb, where: str = "") -> str | None:
    """`ours` equals bitsandbytes' decode of (qb, sb) bit for bit: its native output where
    that agrees with its own torch path, the torch path where the native one has a
    documented defect. Returns the defect met (None when bitsandbytes' paths agree)."""
    with no_dynamo():
        native = bnb.functional.dequantize_4bit(qb, sb)
    ref = bnb_torch_dequant(bnb, qb, sb)
    defect = bnb_native_defect(native, ref, sb.blocksize)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, where
    assert torch.equal(bits(ours), bits(ref)), f"{where}: differs from bitsandbytes' torch path"
    return defect


@pytest.fixture(scope="module")
def smollm2():
    """NF4 SmolLM2 with two PEFT adapters: "default" (r 8, every projection) and "second"
    (r 4, q and v only), both with B drawn at random (PEFT starts B at zero)."""
    from peft import LoraConfig

    from qlora_kernels.bench.onnx import LLAMA, random_lora
    from qlora_kernels.finetune.smollm2 import load_smollm2, smollm2_hf_dir

    m = qk.quantize_model(load_smollm2(), skip=("lm_head",))
    torch.manual_seed(0)  # PEFT draws A from torch's generator: the same adapters whatever ran before
    pm = random_lora(m, LLAMA, r=8, std=0.05, seed=0)
    pm.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B.second" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.set_adapter("default")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    return pm.eval(), list(ids)
