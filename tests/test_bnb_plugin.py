"""The bitsandbytes backend plugin (integrations/bitsandbytes.py). Each check runs in a
fresh process: the plugin registers its kernels process-wide when bitsandbytes is imported,
and in the suite's own process bitsandbytes stays stock (it is the formats' oracle). A
process with the plugin off (QLORA_KERNELS_BNB=0) gives stock bitsandbytes' results to
compare with. bitsandbytes' own test suite runs against the plugin in CI
(scripts/bnb_peer_tests.sh)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import json, sys, warnings, logging
import torch
warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
torch.manual_seed(0)
import bitsandbytes as bnb
import bitsandbytes.functional as F
from qlora_kernels.integrations import bitsandbytes as plugin
def emit(obj):
    print("RESULT " + json.dumps(obj))
"""


def run(code: str, plugin: bool = True, env: dict | None = None) -> dict:
    e = dict(os.environ, QLORA_KERNELS_BNB="1" if plugin else "0", **(env or {}))
    p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=e, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, p.stdout[-2000:] + p.stderr[-2000:]
    out = json.loads(lines[-1][len("RESULT "):])
    out["_stderr"] = p.stderr
    return out


def test_entry_point_loads_the_plugin_and_the_switch_turns_it_off():
    on = run("emit(plugin.status())")
    assert on["active"] and not on["error"]
    assert {"quantize_4bit", "dequantize_4bit", "dequantize_4bit.out", "gemm_4bit", "quantize_blockwise",
            "dequantize_blockwise"} <= set(on["ours"])
    off = run("emit(plugin.status())", plugin=False)
    assert not off["active"] and off["disabled_by_env"] and off["ours"] == []


def test_a_broken_plugin_never_breaks_import_bitsandbytes():
    # A bad QLORA_KERNELS_* value makes importing qlora_kernels fail; bitsandbytes still
    # imports, says why once, and keeps its kernels.
    code = """
    W = torch.randn(64, 64)
    q, st = F.quantize_4bit(W, quant_type="nf4")
    emit({"ok": q.numel()})
    """
    p = subprocess.run([sys.executable, "-c", "import logging, torch, bitsandbytes.functional as F\n"
                        + textwrap.dedent(code).replace("emit(", "print(")],
                       env=dict(os.environ, QLORA_KERNELS_ISA="avx9000"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "bitsandbytes plugin did not load" in p.stderr and "avx9000" in p.stderr


def test_bytes_and_absmax_equal_stock_bitsandbytes():
    """Packed bytes, absmax and the nested absmax of every quant type, blocksize, dtype and
    quant_storage the plugin takes equal stock bitsandbytes' (its CPU kernels, plugin off),
    and dequantization too."""
    code = """
    out = {}
    for qt in ("nf4", "fp4"):
        for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                for nested in (False, True):
                    for storage in (torch.uint8, torch.bfloat16):
                        g = torch.Generator().manual_seed(bs)
                        W = (torch.randn(32, 130, generator=g) * 0.05).to(dt)  # whole bf16 storage elements
                        q, st = F.quantize_4bit(W, blocksize=bs, quant_type=qt, compress_statistics=nested,
                                                quant_storage=storage)
                        d = F.dequantize_4bit(q, st)
                        key = f"{qt} {bs} {dt} {nested} {storage}"
                        out[key] = [q.view(torch.uint8).flatten().tolist(), st.absmax.float().tolist(),
                                    d.float().flatten().tolist()]
                        if nested:
                            out[key].append(st.state2.absmax.tolist())
    emit({"out": out, "status": plugin.status()["calls"]})
    """
    ours, stock = run(code), run(code, plugin=False)
    assert ours["status"].get("quantize_4bit", 0) > 0 and ours["status"].get("dequantize_4bit", 0) > 0
    for key, (q, absmax, d, *nested) in stock["out"].items():
        oq, oabs, od, *onested = ours["out"][key]
        assert oq == q, f"packed bytes differ: {key}"
        assert oabs == absmax, f"absmax differs: {key}"
        assert onested == nested, f"nested absmax differs: {key}"
        assert od == d, f"dequantized values differ: {key}"


LINEAR = """
out = {}
for qt in ("nf4", "fp4"):
    for nested in (False, True):
        for dt in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            lin = torch.nn.Linear(320, 96)
            def make():
                layer = bnb.nn.Linear4bit(320, 96, quant_type=qt, compress_statistics=nested, compute_dtype=dt)
                layer.load_state_dict(lin.state_dict())
                return layer.to("cpu")  # quantizes
            # One layer per mode: stock bitsandbytes on an AVX512-BF16 CPU repacks a layer at
            # its first eval forward and keeps that layout in train mode too.
            for rows in (1, 7):
                x = torch.randn(rows, 320).to(dt)
                with torch.no_grad():
                    y_eval = make().eval()(x)
                layer = make().train()
                xg = x.clone().requires_grad_(True)
                y = layer(xg)
                y.float().sum().backward()
                w = make()
                ref = torch.nn.functional.linear(x.float(), F.dequantize_4bit(w.weight.data, w.weight.quant_state).float(),
                                                 w.bias.float())
                out[f"{qt} {nested} {dt} {rows}"] = [y_eval.float().flatten().tolist(), y.float().flatten().tolist(),
                                                     xg.grad.float().flatten().tolist(), ref.flatten().tolist()]
from bitsandbytes.functional import has_avx512bf16
emit({"out": out, "calls": plugin.status()["calls"], "fallbacks": len(plugin.fallbacks()),
      "repacks": bool(has_avx512bf16()) and not plugin.status()["active"]})
"""


def test_linear4bit_outputs_within_bitsandbytes_tolerance_and_run_our_kernels():
    import torch

    ours, stock = run(LINEAR), run(LINEAR, plugin=False)
    assert ours["calls"].get("gemm_4bit", 0) > 0 and ours["calls"].get("dequantize_4bit", 0) > 0, ours["calls"]
    assert ours["fallbacks"] == 0
    for key, values in stock["out"].items():
        bf16 = "bfloat16" in key
        ref = torch.tensor(values[3])
        for name, a, b in zip(("eval", "train", "dx"), ours["out"][key], values):
            a, b = torch.tensor(a), torch.tensor(b)
            # Against stock, bitsandbytes' own tolerances: its bf16 paths (and, on an
            # AVX512-BF16 CPU, its repacked eval path even for fp32 x) round the weight and x
            # to bf16 before multiplying; ours multiplies in fp32 and rounds once.
            loose = bf16 or (name == "eval" and stock["repacks"])
            atol, rtol = (0.05, 0.05) if loose else (1e-4, 1e-4)
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name} {key} vs stock: {m}")
            if name != "dx":  # and against the exact product of the decoded weight
                tol = (0.02, 0.02) if bf16 else (1e-5, 1e-5)
                torch.testing.assert_close(a, ref, atol=tol[0], rtol=tol[1], msg=lambda m: f"{name} {key}: {m}")


TRAIN_AFTER_EVAL = """
out = {}
for bias in (True, False):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=bias)
    def make():
        layer = bnb.nn.Linear4bit(256, 64, bias=bias, quant_type="nf4", compute_dtype=torch.float32)
        layer.load_state_dict(lin.state_dict())
        return layer.to("cpu")
    x = torch.randn(4, 256)
    fresh = make().train()
    xf = x.clone().requires_grad_(True)
    fresh(xf).sum().backward()
    layer = make().eval()
    with torch.no_grad():
        layer(x)  # an evaluation pass, as the HF Trainer's eval_strategy runs between training steps
    layer.train()
    xg = x.clone().requires_grad_(True)
    try:
        layer(xg).sum().backward()
        out[str(bias)] = None if xg.grad is None else float((xg.grad - xf.grad).abs().max())
    except RuntimeError as e:
        out[str(bias)] = type(e).__name__
emit({"out": out, "status": plugin.status()})
"""


def test_a_layer_trains_after_an_eval_pass():
    """On an AVX512-BF16 CPU stock bitsandbytes 0.50.2 repacks a Linear4bit's weight at its
    first eval forward without grad and keeps that layout in train mode, where its forward
    then skips autograd: the input gradient is lost (no bias) or the forward raises (bias;
    docs/bitsandbytes.md). With the plugin the layer keeps the plain layout, so it trains
    after evaluation exactly as before it, on every CPU."""
    ours = run(TRAIN_AFTER_EVAL)
    assert ours["out"] == {"True": 0.0, "False": 0.0}, ours["out"]


def test_non_finite_weights_quantize_as_bitsandbytes_does():
    code = """
    W = torch.randn(8, 64)
    W[1, 3] = float("nan"); W[5, 0] = float("inf")
    q, st = F.quantize_4bit(W, quant_type="nf4", blocksize=64)
    emit({"q": q.flatten().tolist(), "absmax": [str(v) for v in st.absmax.tolist()],
          "fallbacks": {f"{k[0]}: {k[1]}": v for k, v in plugin.fallbacks().items()}})
    """
    ours, stock = run(code), run(code, plugin=False)
    assert ours["q"] == stock["q"] and ours["absmax"] == stock["absmax"]
    assert ours["fallbacks"] == {"quantize_4bit: non-finite values": 1}


def test_bad_input_keeps_bitsandbytes_errors():
    code = """
    msgs = []
    for call in (lambda: F.quantize_4bit(torch.randn(64), blocksize=100),
                 lambda: F.quantize_4bit(torch.randn(64), quant_type="int4"),
                 lambda: F.quantize_4bit(torch.randint(0, 9, (64,)))):
        try:
            call()
            msgs.append(None)
        except Exception as e:
            msgs.append(type(e).__name__)
    emit({"msgs": msgs})
    """
    assert run(code)["msgs"] == run(code, plugin=False)["msgs"]
    assert None not in run(code, plugin=False)["msgs"]


def test_a_failure_inside_our_kernel_names_the_op():
    code = """
    from qlora_kernels import backends
    def boom(*args):
        raise ValueError("kernel failed")
    layer = bnb.nn.Linear4bit(64, 32).to("cpu").eval()
    layer(torch.randn(1, 64))  # loads the backends
    backends.register_kernel("linear_4bit", "cpu")(boom)
    try:
        with torch.no_grad():
            layer(torch.randn(1, 64))
        emit({"error": None})
    except Exception as e:
        emit({"error": f"{type(e).__name__}: {e}"})
    """
    err = run(code)["error"]
    assert err.startswith("ValueError: bitsandbytes::gemm_4bit (qlora-kernels plugin") and "kernel failed" in err


def test_nested_absmax_is_decoded_again_after_an_edit():
    """The decoded nested absmax lives with the 8-bit tensor; an in-place edit of it (or of
    the nested scale) is seen at the next call, and a tensor at a freed address is new."""
    code = """
    W = torch.randn(64, 256)
    x = torch.randn(1, 256)
    q, st = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    def y():
        return bnb.matmul_4bit(x, q.t(), quant_state=st)
    def ref():
        return x @ F.dequantize_4bit(q, st).t()
    ok = [torch.allclose(y(), ref(), atol=1e-5)]
    st.state2.absmax.mul_(2)
    ok.append(torch.allclose(y(), ref(), atol=1e-5))
    st.absmax[0] = st.absmax[0] // 2
    ok.append(torch.allclose(y(), ref(), atol=1e-5))
    # writes that bump no version counter: through .data and through a numpy view
    st.absmax.data[:5] = 3
    ok.append(torch.allclose(y(), ref(), atol=1e-5))
    st.state2.absmax.numpy()[0] *= 3
    ok.append(torch.allclose(y(), ref(), atol=1e-5))
    st.offset.data.add_(0.5)
    ok.append(torch.allclose(y(), ref(), atol=1e-5))
    # inference tensors (no version counter at all), inside and outside inference mode
    with torch.inference_mode():
        qi, sti = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
        ok.append(torch.allclose(bnb.matmul_4bit(x, qi.t(), quant_state=sti), x @ F.dequantize_4bit(qi, sti).t(),
                                 atol=1e-5))
    ok.append(torch.allclose(bnb.matmul_4bit(x, qi.t(), quant_state=sti), x @ F.dequantize_4bit(qi, sti).t(),
                             atol=1e-5))
    emit({"ok": ok, "calls": plugin.status()["calls"]})
    """
    r = run(code)
    assert r["ok"] == [True] * 8 and r["calls"].get("gemm_4bit", 0) == 8


EDGES = """
def outcome(call):
    try:
        y = call()
        return ["ok", list(y.shape), y.float().flatten().tolist()]
    except Exception as e:
        return ["error", type(e).__name__]
ops = torch.ops.bitsandbytes
q, st = F.quantize_4bit(torch.randn(16, 64), blocksize=64, quant_type="nf4")
A = torch.randn(3, 64)
q2, st2 = F.quantize_4bit(torch.randn(64, 128), blocksize=64, quant_type="nf4")
qe, ste = F.quantize_4bit(torch.empty(0, 64), blocksize=64, quant_type="nf4")
q8 = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
A3 = torch.randn(5, 64)
q3, am3 = ops.quantize_4bit(torch.randn(300, 64), 64, "nf4", torch.uint8)
off3 = am3.mean()
qa3, s3 = F.quantize_blockwise(am3 - off3, blocksize=256)
q4, a4 = ops.quantize_4bit(torch.randn(16, 256), 2048, "nf4", torch.uint8)
q5, a5 = ops.quantize_4bit(torch.randn(8, 63), 64, "nf4", torch.uint8)
cases = {
    "bias of another dtype": lambda: bnb.matmul_4bit(A, q.t(), st, bias=torch.ones(16, dtype=torch.float16)),
    "bias [1, N]": lambda: bnb.matmul_4bit(A, q.t(), st, bias=torch.ones(1, 16)),
    "bias 0-d": lambda: bnb.matmul_4bit(A, q.t(), st, bias=torch.tensor(2.0)),
    "bias of another length": lambda: ops.gemm_4bit(A, q, [16, 64], st.absmax, 64, "nf4", bias=torch.randn(17)),
    "N = 0": lambda: bnb.matmul_4bit(A, qe.t(), ste),
    "absmax longer than the shape": lambda: ops.dequantize_4bit(q2, torch.cat([st2.absmax] * 2), 64, "nf4",
                                                                [64, 128], torch.float32),
    "packed longer than the shape": lambda: ops.dequantize_4bit(q2, st2.absmax[:64], 64, "nf4", [32, 128],
                                                                torch.float32),
    "gemm absmax longer": lambda: ops.gemm_4bit(A, q, [16, 64], torch.cat([st.absmax] * 2), 64, "nf4"),
    "blockwise absmax longer": lambda: F.dequantize_blockwise(q8, absmax=torch.linspace(0.5, 2, 8), blocksize=256),
    "quant_type unknown (dequantize)": lambda: ops.dequantize_4bit(q, st.absmax, 64, "xx", [16, 64], torch.float32),
    "quant_type unknown (gemm)": lambda: ops.gemm_4bit(A, q, [16, 64], st.absmax, 64, "xx"),
    # ours raised ValueError where stock's kernel raises RuntimeError / NotImplementedError
    "quant_type int4 (quantize)": lambda: ops.quantize_4bit(torch.randn(64), 64, "int4", torch.uint8),
    "quant_type NF4 (quantize)": lambda: ops.quantize_4bit(torch.randn(64), 64, "NF4", torch.uint8),
    "nested absmax longer": lambda: ops.gemm_4bit(A3, q3, [300, 64], torch.cat([s3.absmax, torch.ones(3)]), 64,
                                                  "nf4", None, qa3, s3.code, off3),
    # bitsandbytes' CPU kernel reads a prefix here where its own flag says AVX-512, else raises
    "packed longer, blocks of 2048": lambda: ops.dequantize_4bit(torch.cat([q4, q4]), a4, 2048, "nf4", [16, 256],
                                                                 torch.float32),
    "packed longer, odd columns": lambda: ops.dequantize_4bit(torch.cat([q5, q5]), a5, 64, "nf4", [8, 63],
                                                              torch.float32),
}
emit({"out": {k: outcome(c) for k, c in cases.items()}})
"""


def test_edge_calls_end_as_in_stock():
    """Calls at the edges of what bitsandbytes takes (found by a red-team pass): the same
    result (within float tolerance) or the same exception type as stock bitsandbytes."""
    import torch

    ours, stock = run(EDGES)["out"], run(EDGES, plugin=False)["out"]
    assert ours.keys() == stock.keys()
    for k in stock:
        assert ours[k][:2] == stock[k][:2], (k, ours[k][:2], stock[k][:2])
        if stock[k][0] == "ok":
            torch.testing.assert_close(torch.tensor(ours[k][2]), torch.tensor(stock[k][2]), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, k=k: f"{k}: {m}")


def test_a_short_8bit_code_is_an_error_naming_the_op_not_an_abort():
    """A code of fewer than 256 entries: stock's native kernel reads past its end; with the
    plugin the call went to bitsandbytes' compiled default kernel, whose bounds check aborted
    the process (std::terminate, exit 134) once an earlier call had fallen back to it."""
    code = """
    ops = torch.ops.bitsandbytes
    code = F.create_dynamic_map()
    q8 = torch.randint(0, 256, (64, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    absmax = torch.rand(9)
    res = {"f64": ops.dequantize_blockwise(q8, absmax, code, 256, torch.float64).dtype == torch.float64}
    for dtype in (torch.float32, torch.float64):
        try:
            ops.dequantize_blockwise(q8, absmax, code[:255], 256, dtype)
            res[str(dtype)] = "returned"
        except Exception as e:
            res[str(dtype)] = f"{type(e).__name__}: {e}"
    emit(res)
    """
    r = run(code)
    assert r["f64"]
    for dtype in ("torch.float32", "torch.float64"):
        assert r[dtype].startswith("ValueError: bitsandbytes::dequantize_blockwise (qlora-kernels plugin")
        assert "code has 255 entries" in r[dtype]


def test_out_overloads_check_as_bitsandbytes_does():
    """bitsandbytes 0.50 has no CPU kernel for its .out overloads (stock raises
    NotImplementedError for each): ours take them, an ``out`` of any layout included, refuse a
    wrong shape or dtype with bitsandbytes' own checks, and a call ours does not take raises
    NotImplementedError naming the op (not torch's "no tensor arguments"), counted nowhere."""
    code = """
    from qlora_kernels.integrations import bitsandbytes as plugin
    ops = torch.ops.bitsandbytes
    q, st = F.quantize_4bit(torch.randn(16, 64), quant_type="nf4")
    q8, st8 = F.quantize_blockwise(torch.randn(300), blocksize=256)
    want4 = ops.dequantize_4bit(q, st.absmax, 64, "nf4", [16, 64], torch.float32)
    want8 = ops.dequantize_blockwise(q8, st8.absmax, st8.code, 256, torch.float32)
    res = {}
    def attempt(name, call):
        try:
            call()
            res[name] = "ok"
        except Exception as e:
            res[name] = f"{type(e).__name__}: {e}"
    for name, out in {"dense": torch.empty(16, 64), "strided": torch.empty(64, 16).t()}.items():
        attempt(name, lambda: ops.dequantize_4bit.out(q, st.absmax, 64, "nf4", [16, 64], torch.float32, out=out))
        res[name + " equal"] = bool(torch.equal(out, want4))
    out8 = torch.empty(600)[::2]
    attempt("blockwise strided", lambda: ops.dequantize_blockwise.out(q8, st8.absmax, st8.code, 256, torch.float32,
                                                                      out=out8))
    res["blockwise strided equal"] = bool(torch.equal(out8, want8))
    attempt("shape", lambda: ops.dequantize_4bit.out(q, st.absmax, 64, "nf4", [16, 64], torch.float32,
                                                     out=torch.empty(16, 63)))
    attempt("dtype", lambda: ops.dequantize_blockwise.out(q8, st8.absmax, st8.code, 256, torch.float32,
                                                          out=torch.empty(300, dtype=torch.float16)))
    plugin.reset_counts()
    attempt("not ours", lambda: ops.dequantize_4bit.out(q, st.absmax.reshape(1, -1), 64, "nf4", [16, 64],
                                                        torch.float32, out=torch.empty(16, 64)))
    res["fallbacks"] = len(plugin.fallbacks())
    emit(res)
    """
    ours, stock = run(code), run(code, plugin=False)
    assert stock["dense"].startswith("NotImplementedError") and stock["strided"].startswith("NotImplementedError")
    assert ours["dense"] == ours["strided"] == ours["blockwise strided"] == "ok"
    assert ours["dense equal"] and ours["strided equal"] and ours["blockwise strided equal"]
    assert ours["shape"].startswith("RuntimeError") and "Expected out.shape == (16, 64)" in ours["shape"]
    assert ours["dtype"].startswith("RuntimeError") and "Expected out.dtype == torch.float32" in ours["dtype"]
    assert ours["not ours"].startswith("NotImplementedError: bitsandbytes::dequantize_4bit.out has no CPU kernel")
    assert "not the plain layout" in ours["not ours"] and ours["fallbacks"] == 0


def test_a_failed_registration_leaves_every_bitsandbytes_kernel_in_place():
    code = """
    from qlora_kernels.integrations import bitsandbytes as plugin
    ops = torch.ops.bitsandbytes
    W = torch.randn(64, 64)
    plugin._STATE["loaded"] = False  # as if bitsandbytes had not called the entry point yet
    calls = []
    real = torch.library.register_kernel
    def flaky(name, *a, **k):  # the third registration fails
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("registration failed")
        return real(name, *a, **k)
    torch.library.register_kernel = flaky
    plugin._LIBRARIES.clear()  # unregister the kernels the import registered (collected below)
    import gc; gc.collect()
    plugin.reset_counts()
    plugin.load()
    torch.library.register_kernel = real
    ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    ops.dequantize_4bit(*ops.quantize_4bit(W, 64, "nf4", torch.uint8), 64, "nf4", [64, 64], torch.float32)
    emit({"active": plugin.status()["active"], "error": plugin.status()["error"], "calls": plugin.status()["calls"]})
    """
    res = run(code)
    assert res["active"] is False and "registration failed" in res["error"]
    assert res["calls"] == {}  # neither the op registered before the failure nor any other ran ours


@pytest.mark.slow
def test_transformers_load_in_4bit_and_peft_qlora_steps_match_stock():
    code = """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    import tempfile
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    d = tempfile.mkdtemp()
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                             lora_dropout=0.0, init_lora_weights=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(2)
    losses = []
    for step in range(4):
        ids = torch.randint(0, 256, (2, 32), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad()
        losses.append(loss.item())
    emit({"losses": losses, "calls": plugin.status()["calls"], "fallbacks": len(plugin.fallbacks())})
    """
    ours, stock = run(code), run(code, plugin=False)
    assert ours["calls"].get("quantize_4bit", 0) > 0 and ours["calls"].get("dequantize_4bit", 0) > 0, ours["calls"]
    assert ours["fallbacks"] == 0
    for a, b in zip(ours["losses"], stock["losses"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (ours["losses"], stock["losses"])
