"""The opencl backend (kernels/*.cl through pyopencl, PoCL here): its tables against
qlora_kernels.formats, bit-exact quantization and dequantization in both kernel styles,
weight residency, profiling, device selection, vendor builds, and a clear failure when no
OpenCL platform exists.  Nothing here skips: without a working OpenCL device these fail
with the reason (scripts/setup.sh installs PoCL)."""
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import formats, functional
from qlora_kernels import opencl as ocl
from qlora_kernels.backends import kernel_for
from qlora_kernels.backends import reference as ref_backend

from .conftest import bits

STYLES = ["ndrange", "fpga"]


def _require_opencl():
    reason = qk.unavailable_reason("opencl")
    assert reason is None, f"the opencl backend must run here (CI installs PoCL): {reason}"


@pytest.fixture(params=STYLES)
def style(request):
    _require_opencl()
    with qk.use_backend("opencl"), ocl.use_style(request.param):
        yield request.param


def test_backend_is_available_and_serves_every_cpu_op():
    _require_opencl()
    assert qk.available_backends()[:3] == ["reference", "cpu", "opencl"]
    with qk.use_backend("opencl"):
        for op in ("quantize_4bit", "dequantize_4bit", "dequantize_4bit_out", "dequantize_blockwise_8bit",
                   "linear_4bit", "linear_4bit_grad_input"):
            assert kernel_for(op)[0] == "opencl", op
        # documented exception: the 8-bit quantizer of double quantization (absmax only)
        assert kernel_for("quantize_blockwise_8bit")[0] == "reference"


def test_device_tables_equal_formats_bit_for_bit():
    _require_opencl()
    import pyopencl as cl

    rt = ocl.runtime()
    nq = len(formats.QUANT_TYPES)
    code, bounds = np.zeros(16 * nq, np.float32), np.zeros(15 * nq, np.float32)
    order, floor = np.zeros(16 * nq, np.uint8), np.zeros(1, np.float32)
    bufs = [cl.Buffer(rt.ctx, cl.mem_flags.WRITE_ONLY, a.nbytes) for a in (code, bounds, order, floor)]
    k = cl.Kernel(rt.program("quant4"), "qk_dump_tables")
    k(rt.queue, (1,), (1,), *bufs)
    for host, dev in zip((code, bounds, order, floor), bufs):
        cl.enqueue_copy(rt.queue, host, dev)
    rt.queue.finish()
    for i, q in enumerate(formats.QUANT_TYPES):
        b, o = formats.quant_tables(q)
        assert torch.equal(bits(torch.from_numpy(code[16 * i:16 * i + 16])), bits(formats.codebook(q))), q
        assert torch.equal(bits(torch.from_numpy(bounds[15 * i:15 * i + 15])), bits(b)), q
        assert torch.equal(torch.from_numpy(order[16 * i:16 * i + 16]), o), q
    want_floor = torch.tensor([ref_backend._FLOOR], dtype=torch.float32)
    assert torch.equal(bits(torch.from_numpy(floor)), bits(want_floor))


def test_no_number_of_the_format_is_typed_in_a_kernel_file():
    values = set()
    for q in formats.QUANT_TYPES:
        b, _ = formats.quant_tables(q)
        values |= {v for v in formats.codebook(q).tolist() + b.tolist() if v not in (0.0, 1.0, -1.0, 0.5, -0.5)}
    sources = {p.name: p.read_text() for p in ocl.KERNEL_DIR.glob("*.cl")}
    assert set(sources) >= {"common.cl", *(f"{f}.cl" for f in ocl.FAMILIES)}
    for name, text in sources.items():
        for v in values:
            for spelling in (repr(v)[:8], float(v).hex()[:10], f"{v:.6f}"):
                assert spelling not in text, f"{name} spells the format value {v} ({spelling})"
        assert not re.search(r"0x1\.[0-9a-f]{6}", text), f"{name} holds a hex float literal"


def _awkward(n: int, seed: int) -> torch.Tensor:
    """Normal weights with blocks that probe every rounding decision: exact ties at the
    bucket bounds (block absmax 1), their neighbours, zeros, -0.0, subnormals, values whose
    reciprocal absmax is subnormal, and an all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    special = []
    for q in formats.QUANT_TYPES:
        b = formats.quant_tables(q)[0]
        special += [torch.tensor([1.0]), b, torch.nextafter(b, torch.tensor(2.0)), torch.nextafter(b, -torch.tensor(2.0))]
    special += [torch.zeros(64), torch.tensor([-0.0, 1e-40, -3e-39, 1e-45]), torch.tensor([3e38, -1e38, 2.5e38]),
                torch.full((5,), 1e-38)]
    s = torch.cat(special)[: max(0, n - 1)]
    x[: s.numel()] = s
    return x


QUANT_CASES = [  # (n, blocksize, quant_type, input dtype)
    (1, 64, "nf4", torch.float32), (7, 32, "fp4", torch.float32), (4097, 64, "nf4", torch.float32),
    (4097, 128, "fp4", torch.bfloat16), (64 * 33 + 5, 32, "nf4", torch.float16), (1000, 4096, "fp4", torch.float32),
    (3 * 4096, 4096, "nf4", torch.float32), (128 * 257, 256, "nf4", torch.float32),
]


@pytest.mark.parametrize("n,blocksize,quant_type,dtype", QUANT_CASES,
                         ids=[f"{n}-bs{b}-{q}-{str(d)[6:]}" for n, b, q, d in QUANT_CASES])
def test_quantize_gives_the_same_bytes_and_dequantize_the_same_bits(style, n, blocksize, quant_type, dtype):
    W = _awkward(n, seed=n + blocksize).to(dtype)
    if dtype != torch.float32:
        W = torch.where(W.float().abs() > 1e4, torch.zeros_like(W), W)  # stay finite in 16 bits
    want_p, want_a = ref_backend.quantize_4bit(W, blocksize, quant_type)
    packed, absmax = torch.ops.qlora_kernels.quantize_4bit(W, blocksize, quant_type)
    assert torch.equal(packed, want_p)
    assert torch.equal(bits(absmax), bits(want_a))
    for out_dtype in formats.INPUT_DTYPES:
        want = ref_backend.dequantize_4bit(want_p, want_a, blocksize, quant_type, [n], out_dtype)
        got = torch.ops.qlora_kernels.dequantize_4bit(want_p, want_a, blocksize, quant_type, [n], out_dtype)
        assert torch.equal(bits(got), bits(want)), f"dequantize to {out_dtype}"
        with qk.use_backend("cpu"):
            assert torch.equal(bits(torch.ops.qlora_kernels.dequantize_4bit(want_p, want_a, blocksize, quant_type, [n],
                                                                            out_dtype)), bits(got))


def test_double_quantization_and_the_public_api_match_the_cpu_backend(style):
    W = torch.randn(96, 4097 // 3) * 0.1
    packed, state = functional.quantize_4bit(W, "nf4", 64, double_quant=True)
    out = torch.empty(W.shape, dtype=torch.bfloat16)
    functional.dequantize_4bit(packed, state, out=out)
    with qk.use_backend("cpu"):
        want_p, want_s = functional.quantize_4bit(W, "nf4", 64, double_quant=True)
        want = functional.dequantize_4bit(want_p, want_s, dtype=torch.bfloat16)
    assert torch.equal(packed, want_p) and state == want_s
    assert torch.equal(bits(out), bits(want))
    assert torch.equal(bits(functional.absmax_fp32(state)), bits(functional.absmax_fp32(want_s)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise_the_reference_error(style, bad):
    W = torch.randn(10, 64)
    W[3, 5] = bad
    W[7, 0] = bad
    with pytest.raises(ValueError) as want:
        ref_backend.quantize_4bit(W, 64, "nf4")
    with pytest.raises(ValueError) as got:
        torch.ops.qlora_kernels.quantize_4bit(W, 64, "nf4")
    assert str(got.value) == str(want.value) and "block 3" in str(got.value)


def test_empty_inputs(style):
    packed, absmax = torch.ops.qlora_kernels.quantize_4bit(torch.empty(0, 5), 64, "nf4")
    assert packed.shape == (0, 1) and absmax.shape == (0,)
    assert torch.ops.qlora_kernels.dequantize_4bit(packed, absmax, 64, "nf4", [0, 5], torch.float32).shape == (0, 5)


def test_packed_weight_stays_on_the_device_between_calls():
    _require_opencl()
    torch.manual_seed(0)
    layer = qk.nn.LoraLinear(qk.nn.Linear4bit(48, 40, double_quant=True), r=4)
    x = torch.randn(5, 48, requires_grad=True)
    with qk.use_backend("opencl"):
        ocl.clear_cache()
        ocl.reset_stats()
        for _ in range(4):
            layer(x).sum().backward()
        s = ocl.stats()
        # the packed weight and its decoded absmax, once; then 3 forwards + 4 input grads reuse both
        assert s["weight_uploads"] == 2 and s["weight_hits"] == 2 * 7, s
        with torch.no_grad():
            layer.base_layer.weight[0] ^= 1  # in place (version bump): the device copy is stale now
        layer(x)
        assert ocl.stats()["weight_uploads"] == 3


def test_profile_reports_each_kernel_and_transfer():
    _require_opencl()
    packed, state = functional.quantize_4bit(torch.randn(64, 64))
    with qk.use_backend("opencl"):
        qk.linear_4bit(torch.randn(3, 64), packed, state)
    prof = ocl.last_profile()
    names = [p["name"] for p in prof]
    assert "linear4_fwd_gemv4" in names and "download y" in names, names
    assert all(p["op"] == "linear_4bit" and p["seconds"] >= 0 for p in prof)
    info = ocl.device_info()
    assert info["selector"] == "0:0" and "OpenCL C" in info["opencl_c_version"]


def test_style_is_validated():
    with pytest.raises(ValueError, match="style must be one of"):
        ocl.set_style("systolic")
    with pytest.raises(ValueError, match="style must be one of"), ocl.use_style("systolic"):
        pass
    assert ocl.get_style() in STYLES


def test_use_style_holds_in_its_own_thread_only():
    """A thread's `with use_style(...)` must not switch the kernels of another thread, whose
    op reads the style more than once (the adapter fused or not), nor leave the process in
    the other style when two threads' blocks interleave."""
    import threading

    default = ocl.get_style()
    other = "fpga" if default == "ndrange" else "ndrange"
    entered, release, seen = threading.Event(), threading.Event(), []

    def worker():
        with ocl.use_style(other):
            seen.append(ocl.get_style())
            entered.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    assert entered.wait(10)
    with ocl.use_style(default):  # nested in time with the worker's block, exited after it
        assert ocl.get_style() == default
        release.set()
        t.join(10)
    assert seen == [other] and ocl.get_style() == default


def test_dequantize_out_of_one_element_with_any_stride(style):
    """torch calls a one-element tensor contiguous whatever its strides; the result must
    land in it, not in a copy."""
    W = torch.tensor([[0.75]])
    packed, st = qk.quantize_4bit(W, blocksize=64)
    big = torch.full((3, 6), -7.0)
    for out in (big[1:2, ::2][:, :1], big[2:3, 1:2].t()):
        functional.dequantize_4bit(packed, st, out=out)
        assert out.item() == 0.75, (out.stride(), out)
    assert (big == -7.0).sum() == 16


@pytest.mark.parametrize("vendor", ["xilinx", "intel"])
def test_every_family_builds_with_the_vendor_hints_on(vendor):
    """The FPGA compilers' attributes and pragmas parse (as ignored hints) on PoCL's clang,
    so the file taken to a board is the file tested here."""
    _require_opencl()
    import pyopencl as cl

    ctx = ocl.runtime().ctx
    for family in ocl.FAMILIES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown-attribute warnings are the point
            prg = cl.Program(ctx, ocl.program_source(family)).build(options=ocl.build_options(vendor))
        assert prg.kernel_names


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OCL_ICD", "QLORA_KERNELS_OPENCL"))}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=120)


def test_device_and_style_are_selected_by_index_name_or_environment():
    _require_opencl()
    assert ocl.Runtime("0:0").device.name == ocl.runtime().device.name
    platform_word = ocl.runtime().platform.name.split()[-1]
    assert ocl.Runtime(platform_word.upper()).platform_index == 0
    code = "import qlora_kernels as qk, qlora_kernels.opencl as o; print(qk.unavailable_reason('opencl'), o.get_style())"
    r = _run(code, QLORA_KERNELS_OPENCL_DEVICE="3:9", QLORA_KERNELS_OPENCL_STYLE="fpga")
    assert r.returncode == 0, r.stderr
    assert "QLORA_KERNELS_OPENCL_DEVICE='3:9' matches no OpenCL device; available: 0:0" in r.stdout
    assert r.stdout.split()[-1] == "fpga"


def test_without_an_opencl_platform_the_backend_is_absent_and_says_how_to_install(tmp_path):
    code = (
        "import qlora_kernels as qk\n"
        "assert 'opencl' not in qk.available_backends()\n"
        "print(qk.unavailable_reason('opencl'))\n"
        "try:\n"
        "    qk.set_backend('opencl')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    r = _run(code, OCL_ICD_VENDORS=str(tmp_path))  # an ICD directory with no driver in it
    assert r.returncode == 0, r.stderr
    assert "no OpenCL platform" in r.stdout and "apt-get install pocl-opencl-icd" in r.stdout
    assert "ERROR backend: 'opencl' is not available here" in r.stdout
