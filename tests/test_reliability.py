"""Regression tests of the memory-safety and clarity defects found by the sanitizer attack
on the public entry points (issue "Memory-safe under any input"): each failed on the main
of 2026-11-29 (a buffer read past its end, uninitialized memory returned, valid input
refused, a silent fallback, an unclear error) and passes now."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _C, formats
from qlora_kernels.backends import reference

from .conftest import native_paths, on_path


def _layer(N=64, K=128, double_quant=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed, state = qk.quantize_4bit(torch.randn(N, K, generator=g), double_quant=double_quant)
    return torch.randn(3, K, generator=g), packed, state


# ---- 1. a bias of the wrong length was read past its end (heap-buffer-overflow) ----

@pytest.mark.parametrize("compute", ["fp32", "int8"])
def test_bias_of_the_wrong_length_is_refused(path, compute):
    x, packed, state = _layer()
    for bias in (torch.randn(3), torch.randn(65), torch.randn(64, 1), torch.randn(8, 8)):
        for rows in (x, x[:1]):  # the one-row call takes the inference fast path once remembered
            for _ in range(2):
                with pytest.raises(ValueError, match=r"bias has shape"):
                    with torch.no_grad():
                        qk.linear_4bit(rows, packed, state, bias, compute=compute)
    with pytest.raises(TypeError, match="bias must be float32"):
        qk.linear_4bit(x, packed, state, torch.arange(64))


def test_bias_length_is_checked_by_the_bindings_too():
    x, packed, state = _layer()
    y, b = torch.empty(3, 64), torch.randn(3)
    code = formats.codebook("nf4")
    for entry in (_C.linear4_forward, _C.linear4_q8_forward):
        c = code if entry is _C.linear4_forward else formats.int8_codebook("nf4")
        with pytest.raises(ValueError, match="bias has 3 entries, but the layer has N=64"):
            entry(x.data_ptr(), 3, 128, 128, packed.data_ptr(), packed.numel(), state.absmax.data_ptr(),
                  state.absmax.numel(), c.data_ptr(), 64, 64, b.data_ptr(), b.numel(), y.data_ptr(), 64, 1)
    W = torch.randn(64, 128)
    with pytest.raises(ValueError, match="bias has 3 entries"):
        _C.dense_forward(x.data_ptr(), 3, 128, 128, W.data_ptr(), 64, 128, b.data_ptr(), 3, y.data_ptr(), 64, 1)


# ---- 2. a nested map without 256 entries was read past its end ----

def test_tampered_nested_map_is_refused_everywhere(path):
    x, packed, state = _layer(double_quant=True)
    d = state.as_dict()
    for n in (0, 16, 255, 257):
        bad = dict(d, nested_quant_map=formats.dynamic_map()[:n] if n <= 256 else torch.zeros(n))
        with pytest.raises(ValueError, match=r"nested_quant_map\) must be the 256-entry"):
            formats.QuantState.from_dict(bad)
        with pytest.raises(ValueError, match=r"nested_quant_map\) must be the 256-entry"):
            formats.QuantState.from_dict(formats.QuantState(**{**state.__dict__}).as_dict(packed=True) | {
                "nested_quant_map": bad["nested_quant_map"]})
    set_directly = formats.QuantState(**{**state.__dict__})
    set_directly.state2 = formats.QuantState(**{**state.state2.__dict__, "code": formats.dynamic_map()[:100]})
    with pytest.raises(ValueError, match="nested_quant_map"):
        qk.dequantize_4bit(packed, set_directly)
    with pytest.raises(ValueError, match="nested_quant_map"):
        qk.linear_4bit(x, packed, set_directly)
    with pytest.raises(ValueError, match="256-entry"):
        torch.ops.qlora_kernels.dequantize_blockwise_8bit(state.absmax, state.state2.absmax,
                                                          formats.dynamic_map()[:100], 256)


def test_nested_map_size_is_checked_by_the_bindings_too():
    _, _, state = _layer(double_quant=True)
    q, a2, code = state.absmax, state.state2.absmax, formats.dynamic_map()
    out = torch.empty(q.numel())
    with pytest.raises(ValueError, match="code has 100 entries; the 8-bit map needs 256"):
        _C.dequantize_8bit(q.data_ptr(), a2.data_ptr(), a2.numel(), code.data_ptr(), 100, q.numel(), 256,
                           out.data_ptr())
    with pytest.raises(ValueError, match="code has 16 entries"):
        _C.quantize_8bit(out.data_ptr(), out.numel(), 256, code.data_ptr(), 16, q.data_ptr(), a2.data_ptr(),
                         a2.numel())


# ---- 3. a meta tensor among CPU ones sent the call to the fake kernel (uninitialized memory) ----

def _meta(t):
    return None if t is None else t.to("meta")


def test_meta_argument_among_cpu_ones_is_refused(path):
    x, packed, state = _layer()
    bias, A, B = torch.randn(64), torch.randn(4, 128), torch.randn(64, 4)
    absmax = state.absmax
    ops = torch.ops.qlora_kernels
    calls = {
        "linear_4bit": (ops.linear_4bit, [x, packed, absmax, 64, "nf4", 64, bias], [1, 2, 6]),
        "linear_4bit_int8": (ops.linear_4bit_int8, [x, packed, absmax, 64, "nf4", 64, bias], [1, 2, 6]),
        "linear_4bit_grad_input": (ops.linear_4bit_grad_input, [torch.randn(3, 64), packed, absmax, 64, "nf4", 128],
                                   [1, 2]),
        "lora_linear_4bit": (ops.lora_linear_4bit, [x, packed, absmax, 64, "nf4", 64, A, B, 2.0, bias, None],
                             [1, 2, 6, 7, 9]),
        "lora_linear": (ops.lora_linear, [x, torch.randn(64, 128), A, B, 2.0, bias, None], [1, 2, 3, 5]),
        "linear_cross_entropy": (ops.linear_cross_entropy, [x, torch.randn(50, 128), torch.randn(50),
                                                            torch.randint(0, 50, (3,)), -100, False, False, False],
                                 [1, 2, 3]),
        "dequantize_4bit": (ops.dequantize_4bit, [packed, absmax, 64, "nf4", [64, 128], torch.float32], [1]),
        "dequantize_blockwise_8bit": (ops.dequantize_blockwise_8bit,
                                      [torch.zeros(300, dtype=torch.uint8), torch.ones(2), formats.dynamic_map(),
                                       256], [1, 2]),
        "quantize_blockwise_8bit": (ops.quantize_blockwise_8bit, [torch.randn(300), formats.dynamic_map(), 256], [1]),
    }
    for name, (op, args, meta_positions) in calls.items():
        for i in meta_positions:
            bad = list(args)
            bad[i] = _meta(bad[i])
            with pytest.raises(ValueError, match="must be on the same device"):
                op(*bad)
    # the public functions too, with a meta state or LoRA factor
    meta_state = formats.QuantState(**{**state.__dict__, "absmax": state.absmax.to("meta")})
    with pytest.raises(ValueError, match="same device"):
        qk.linear_4bit(x, packed, meta_state)
    with pytest.raises(ValueError, match="same device"):
        qk.lora_linear_4bit(x, packed, state, A.to("meta"), B, 2.0)
    with pytest.raises(ValueError, match="same device"):
        qk.linear_cross_entropy(x, torch.randn(50, 128, device="meta"), torch.randint(0, 50, (3,)))
    # all on meta stays legitimate: shapes only
    y = ops.linear_4bit(x.to("meta"), packed.to("meta"), absmax.to("meta"), 64, "nf4", 64, None)
    assert y.device.type == "meta" and y.shape == (3, 64)


# ---- 4. one output, one row: a stride-0 gradient was refused by the cpu backend ----

@pytest.mark.parametrize("N,K", [(1, 64), (1, 7), (5, 64)])
def test_backward_of_one_row_accepts_expanded_gradients(path, N, K):
    packed, state = qk.quantize_4bit(torch.randn(N, K), blocksize=64)
    x = torch.randn(1, K, requires_grad=True)
    qk.linear_4bit(x, packed, state).sum().backward()  # .sum()'s gradient is an expanded (stride-0) tensor
    with on_path("reference", None):
        xr = x.detach().clone().requires_grad_()
        qk.linear_4bit(xr, packed, state).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)


# ---- 5. an unknown environment value silently turned the fast backend off ----

def _python(code: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("var,value,valid", [
    ("QLORA_KERNELS_ISA", "scaler", "scalar"),
    ("QLORA_KERNELS_INT8_REPACK", "yes", "0, 1"),
    ("QLORA_KERNELS_OPENCL_STYLE", "pipelined", "ndrange, fpga"),
    ("QLORA_KERNELS_OPENCL_CACHE_MB", "-5", "whole number"),
    ("QLORA_KERNELS_DROPOUT", "fast", "native, torch"),
])
def test_unknown_environment_value_fails_at_import_naming_the_variable(var, value, valid):
    if var == "QLORA_KERNELS_ISA":  # the library raises (one variable is enough to show it)
        r = _python("import qlora_kernels", **{var: value})
        assert r.returncode != 0
        assert var in r.stderr and valid in r.stderr and "EnvironmentValueError" in r.stderr, r.stderr
    # the command says it in one line, with exit status 2
    r = subprocess.run([sys.executable, "-m", "qlora_kernels.cli", "info"], env=dict(os.environ, **{var: value}),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("qlora-kernels: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert var in r.stderr and "Traceback" not in r.stderr


def test_isa_variable_caps_the_paths_like_a_cpu_without_them():
    """QLORA_KERNELS_ISA=scalar makes the extension behave as on a CPU without AVX2: only the
    scalar path is offered, and forcing a wider one is refused naming the variable."""
    code = ("import qlora_kernels._C as c, qlora_kernels as qk\n"
            "print(c.supported_isas(), c.get_isa(), qk.get_backend(), c.linear4_q8_plan(4096, 4096, 64))\n"
            "try:\n    c.set_isa('avx2')\nexcept ValueError as e:\n    print('refused:', e)\n")
    r = _python(code, QLORA_KERNELS_ISA="scalar")
    assert r.returncode == 0, r.stderr
    assert "['scalar'] scalar cpu scalar" in r.stdout
    if "avx2" in native_paths():
        assert "refused: QLORA_KERNELS_ISA=scalar caps this process" in r.stdout


# ---- 6. unclear errors ----

def test_state_fields_from_outside_get_clear_errors():
    _, packed, state = _layer(double_quant=True)
    d = state.as_dict()
    cases = [
        (dict(d, nested_blocksize=0), r"nested_blocksize\) must be a positive int"),
        (dict(d, dtype="float64"), "dtype must be one of"),
        (dict(d, dtype="no_such_dtype"), "dtype must be one of"),
        (dict(d, nested_dtype="int4"), "nested_dtype must be one of"),
        (dict(d, blocksize="sixty-four"), "blocksize must be an integer"),
        (dict(d, shape=[2**40, 128]), "absmax has"),
        (dict(d, shape="64x128"), "shape must be a list"),
        (dict(d, nested_offset=float("nan")), "offset"),
        ({k: v for k, v in d.items() if k != "nested_offset"}, "nested_offset"),
    ]
    for bad, words in cases:
        with pytest.raises(ValueError, match=words):
            formats.QuantState.from_dict(bad)
    # a state set by hand claiming a huge shape over a small packed tensor: refused before
    # anything is allocated
    plain_packed, plain = qk.quantize_4bit(torch.randn(64, 64))
    huge = formats.QuantState(**{**plain.__dict__, "shape": torch.Size([2**40, 128])})
    t0 = time.perf_counter()
    for call in (lambda: qk.dequantize_4bit(plain_packed, huge), lambda: qk.linear_4bit(torch.randn(1, 128),
                                                                                         plain_packed, huge)):
        with pytest.raises(ValueError, match="absmax has 64 entries"):
            call()
    assert time.perf_counter() - t0 < 5


def test_loss_with_empty_vocabulary_or_hidden_size(path):
    with pytest.raises(ValueError, match="vocabulary"):
        qk.linear_cross_entropy(torch.randn(3, 16), torch.randn(0, 16), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden size"):
        qk.linear_cross_entropy(torch.randn(3, 0), torch.randn(10, 0), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_lora_scaling_is_refused(scaling):
    x, packed, state = _layer()
    A, B = torch.randn(4, 128), torch.randn(64, 4)
    with pytest.raises(ValueError, match="scaling must be finite"):
        qk.lora_linear_4bit(x, packed, state, A, B, scaling)
    with pytest.raises(ValueError, match="scaling must be finite"):
        qk.lora_linear(x, torch.randn(64, 128), A, B, scaling)


def test_finetune_with_one_example_names_the_file_and_leaves_no_folder(tmp_path, capsys):
    from .finetune_helpers import run_inproc

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    out = tmp_path / "run"
    rc, _, err = run_inproc(["--data", str(data), "--output", str(out)], capsys)
    assert rc == 2 and "one.jsonl" in err and "1 unique example" in err, err
    assert not out.exists()


def test_reference_agrees_on_the_regression_shapes():
    """The regression inputs that are valid give the reference backend's result on every path."""
    x, packed, state = _layer(N=1, K=64)
    ref = reference.dequantize_4bit(packed, state.absmax, 64, "nf4", [1, 64], torch.float32)
    for isa in native_paths():
        with on_path("cpu", isa):
            assert torch.equal(qk.dequantize_4bit(packed, state), ref)
