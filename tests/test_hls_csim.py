"""C-simulation of every HLS top function (hls/*.cpp) with plain g++: the testbench in
hls/tb is compiled once, golden data is produced here by the reference backend into a
temporary directory, and each case runs as `qk_tb <kernel> <dir>`. Dequantization must
be bit-exact; matmuls must stay within the fp32 dot-product bound of the reference."""
from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import formats
from qlora_kernels.functional import absmax_fp32

ROOT = Path(__file__).resolve().parents[1]
HLS = ROOT / "hls"
EPS32 = 2.0**-24



def test_gxx_is_available():
    """The package build needs g++ too, so the C-simulation never has a reason to skip."""
    assert shutil.which("g++") is not None


@pytest.fixture(scope="session")
def tb(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("hls_tb") / "qk_tb"
    sources = [str(HLS / "tb" / "tb_main.cpp")] + sorted(glob.glob(str(HLS / "host" / "*.cpp"))) + sorted(
        glob.glob(str(HLS / "*.cpp")))
    cmd = ["g++", "-std=c++17", "-O1", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-label",
           "-I", str(HLS), *sources, "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"testbench build failed:\n{' '.join(cmd)}\n{r.stderr}"
    return exe


def write_case(d: Path, meta: dict, **arrays) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.txt").write_text("".join(f"{k} {v}\n" for k, v in meta.items()))
    for name, a in arrays.items():
        a = a.detach().contiguous().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(a)
        a.numpy().tofile(d / f"{name}.bin")
    return d


def run(tb: Path, kernel: str, case: Path) -> str:
    r = subprocess.run([str(tb), kernel, str(case)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "PASS" in r.stdout, f"{kernel} on {case.name}: {r.stdout}{r.stderr}"
    return r.stdout


def dot_bound(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(K + 2) u (|x| @ |W|^T): tests/test_linear.py's bound, in float32 for the testbench."""
    K = x.shape[-1]
    return ((K + 2) * EPS32 * (x.abs().double() @ W.abs().double().t()) + 1e-30).float()


def quantized(N, K, quant_type, blocksize, double_quant=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    packed, state = qk.quantize_4bit(W, quant_type, blocksize, double_quant)
    with qk.use_backend("reference"):
        Wd = qk.dequantize_4bit(packed, state)
        absmax = absmax_fp32(state)
    return packed, absmax, Wd


DECODE = [("nf4", 64, 999), ("fp4", 128, 4097), ("nf4", 32, 2048), ("fp4", 4096, 10000)]


@pytest.mark.parametrize("quant_type,blocksize,n", DECODE, ids=[f"{q}-bs{b}-n{n}" for q, b, n in DECODE])
def test_decode_unit_is_bit_exact(tb, tmp_path, quant_type, blocksize, n):
    g = torch.Generator().manual_seed(n)
    W = torch.randn(n, generator=g) * 3
    W[:7] = 0.0  # an all-zero start exercises the code of 0.0
    packed, state = qk.quantize_4bit(W, quant_type, blocksize)
    with qk.use_backend("reference"):
        expected = qk.dequantize_4bit(packed, state).reshape(-1)
    case = write_case(tmp_path / "decode", {"n": n, "blocksize": blocksize}, packed=packed, absmax=state.absmax,
                      code=formats.codebook(quant_type), expected=expected)
    assert "bit-exact" in run(tb, "decode", case)


def test_double_quant_absmax_decode_is_bit_exact(tb, tmp_path):
    W = torch.randn(300, 256) * 0.02
    _, state = qk.quantize_4bit(W, "nf4", 64, double_quant=True)
    with qk.use_backend("reference"):
        expected = absmax_fp32(state)
    s2 = state.state2
    case = write_case(tmp_path / "dq", {"n": state.absmax.numel(), "blocksize2": s2.blocksize}, q=state.absmax,
                      absmax2=s2.absmax.float(), dmap=s2.code.float(), offset=state.offset.float().reshape(1),
                      expected=expected)
    assert "bit-exact" in run(tb, "absmax_dq", case)


def linear_case(tmp_path, name, M, K, N, quant_type, blocksize, bias, dq=False):
    packed, absmax, Wd = quantized(N, K, quant_type, blocksize, dq, seed=M * K + N)
    x = torch.randn(M, K)
    b = torch.randn(N) if bias else None
    with qk.use_backend("reference"):
        expected = qk.linear_4bit(x, packed, qk.QuantState(absmax=absmax, shape=torch.Size([N, K]),
                                                           code=formats.codebook(quant_type), blocksize=blocksize,
                                                           quant_type=quant_type, dtype=torch.float32), b)
    bound = dot_bound(x, Wd) + EPS32 * expected.abs() + (EPS32 * b.abs() if bias else 0)
    arrays = dict(x=x, packed=packed, absmax=absmax, code=formats.codebook(quant_type), expected=expected, bound=bound)
    if bias:
        arrays["bias"] = b
    return write_case(tmp_path / name, {"M": M, "K": K, "N": N, "blocksize": blocksize}, **arrays)


GEMV = [(384, 300, "nf4", 64, True, False), (512, 70, "fp4", 256, False, True), (96, 33, "nf4", 32, True, True),
        (8320, 20, "nf4", 128, False, False)]


@pytest.mark.parametrize("K,N,quant_type,blocksize,bias,dq", GEMV,
                         ids=[f"K{k}-N{n}-{q}-bs{b}" for k, n, q, b, *_ in GEMV])
def test_gemv_engine_within_fp32_bound(tb, tmp_path, K, N, quant_type, blocksize, bias, dq):
    run(tb, "gemv", linear_case(tmp_path, "gemv", 1, K, N, quant_type, blocksize, bias, dq))


GEMM = [(37, 256, 200, "nf4", 64, True), (20, 640, 50, "fp4", 128, False), (3, 96, 17, "nf4", 32, False)]


@pytest.mark.parametrize("M,K,N,quant_type,blocksize,bias", GEMM, ids=[f"M{m}-K{k}-N{n}" for m, k, n, *_ in GEMM])
def test_gemm_engine_within_fp32_bound(tb, tmp_path, M, K, N, quant_type, blocksize, bias):
    run(tb, "gemm", linear_case(tmp_path, "gemm", M, K, N, quant_type, blocksize, bias))


@pytest.mark.parametrize("M,N,K,quant_type,blocksize", [(20, 150, 384, "nf4", 64), (1, 40, 96, "fp4", 32),
                                                         (17, 33, 512, "nf4", 512)])
def test_input_gradient_engine_within_fp32_bound(tb, tmp_path, M, N, K, quant_type, blocksize):
    packed, absmax, Wd = quantized(N, K, quant_type, blocksize, seed=N + K)
    dy = torch.randn(M, N)
    state = qk.QuantState(absmax=absmax, shape=torch.Size([N, K]), code=formats.codebook(quant_type),
                          blocksize=blocksize, quant_type=quant_type, dtype=torch.float32)
    with qk.use_backend("reference"):
        expected = torch.ops.qlora_kernels.linear_4bit_grad_input(dy, packed, absmax, blocksize, quant_type, K)
    assert torch.equal(qk.dequantize_4bit(packed, state), Wd)
    case = write_case(tmp_path / "grad", {"M": M, "K": K, "N": N, "blocksize": blocksize}, dy=dy, packed=packed,
                      absmax=absmax, code=formats.codebook(quant_type), expected=expected,
                      bound=dot_bound(dy, Wd.t()))
    run(tb, "gemm_t", case)


def test_bf16_gemv_engine_within_fp32_bound(tb, tmp_path):
    N, K = 100, 200
    W = (torch.randn(N, K) * 0.05).to(torch.bfloat16)
    W[0, :5] = 0.0
    x = torch.randn(K)
    expected = W.float() @ x
    case = write_case(tmp_path / "bf16", {"N": N, "K": K}, w=W.view(torch.int16), x=x, expected=expected,
                      bound=dot_bound(x.reshape(1, K), W.float()).reshape(-1))
    run(tb, "gemv_bf16", case)


def test_lora_down_and_up_engines_within_fp32_bound(tb, tmp_path):
    M, K, N, r, s = 40, 300, 70, 16, 2.0
    x, A, B, y_in = torch.randn(M, K), torch.randn(r, K) * 0.1, torch.randn(N, r) * 0.1, torch.randn(M, N)
    u = x @ A.t()
    run(tb, "lora_down", write_case(tmp_path / "down", {"M": M, "K": K, "r": r}, x=x, a=A, expected=u,
                                    bound=dot_bound(x, A)))
    y = torch.addmm(y_in, u, B.t(), alpha=s)
    bound = s * dot_bound(u, B) + 2 * EPS32 * (y_in.abs() + y.abs())
    run(tb, "lora_up", write_case(tmp_path / "up", {"M": M, "N": N, "r": r}, u=u, b=B, y_in=y_in,
                                  scaling=torch.tensor([s]), expected=y, bound=bound))


def test_testbench_detects_a_wrong_result(tb, tmp_path):
    """The comparison is live: a golden file off by one ulp fails the testbench."""
    packed, state = qk.quantize_4bit(torch.randn(256), "nf4", 64)
    with qk.use_backend("reference"):
        expected = qk.dequantize_4bit(packed, state).reshape(-1)
    expected[17] = torch.nextafter(expected[17], torch.tensor(float("inf")))
    case = write_case(tmp_path / "bad", {"n": 256, "blocksize": 64}, packed=packed, absmax=state.absmax,
                      code=formats.codebook("nf4"), expected=expected)
    r = subprocess.run([str(tb), "decode", str(case)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "FAIL element 17" in r.stdout
