"""The opencl backend on PoCL beside the cpu backend, same inputs, same run: linear_4bit
at M=1 and M=512 on 4096x4096, and one QLoRA layer forward+backward.  The opencl entries
are "ours" in each group, so the report's ratio column reads cpu time / opencl time
(below 1: OpenCL is slower).  The target (issue #5): NDRange within 3x of the cpu backend.
PoCL runs one worker thread per core (POCL_MAX_PTHREAD_COUNT limits it); torch uses
--bench-threads (2 by default)."""
import os

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import functional
from qlora_kernels import opencl as ocl
from qlora_kernels.bench import Case
from qlora_kernels.bench.linear import linear_inputs

assert qk.unavailable_reason("opencl") is None, f"the opencl backend must run here: {qk.unavailable_reason('opencl')}"
POCL_THREADS = os.environ.get("POCL_MAX_PTHREAD_COUNT", str(os.cpu_count()))
EXTRA = {"pocl_threads": POCL_THREADS, "device": ocl.device_info()["device"]}


def _on(backend: str, fn, style: str = "ndrange"):
    def run():
        with qk.use_backend(backend), ocl.use_style(style):
            return fn()
    return run


def _direct_cpp(x, packed, state, N):
    """The fused C++ kernel while the cpu backend does not dispatch to it yet (its
    linear_4bit then falls back to the reference: dequantize + torch matmul)."""
    from qlora_kernels import _C, formats
    from qlora_kernels.backends import kernel_for

    if kernel_for("linear_4bit", "cpu")[0] == "cpu" or not hasattr(_C, "linear4_forward"):
        return None
    M, K = x.shape
    code = formats.codebook(state.quant_type)
    y = torch.empty(M, N)
    return lambda: _C.linear4_forward(x.data_ptr(), M, K, K, packed.data_ptr(), packed.numel(), state.absmax.data_ptr(),
                                      state.absmax.numel(), code.data_ptr(), N, state.blocksize, 0, 0, y.data_ptr(), N,
                                      torch.get_num_threads())


def linear_group(M: int, K: int = 4096, N: int = 4096, fpga: bool = False) -> list[Case]:
    _, x, packed, state, flops = linear_inputs(M, K, N)
    g = f"opencl linear M={M} {K}->{N}"
    f = lambda: functional.linear_4bit(x, packed, state)  # noqa: E731
    cases = [
        Case(g, "opencl NDRange (PoCL)", _on("opencl", f), True, flops, "GFLOP/s", EXTRA),
        Case(g, "cpu backend", _on("cpu", f), False, flops, "GFLOP/s", EXTRA),
    ]
    direct = _direct_cpp(x, packed, state, N)
    if direct is not None:
        cases.append(Case(g, "C++ linear4_forward, called directly", direct, False, flops, "GFLOP/s", EXTRA))
    if fpga:  # the single work-item source on one PoCL thread: what emulation costs
        cases.append(Case(g, "opencl FPGA-style task (PoCL)", _on("opencl", f, "fpga"), False, flops, "GFLOP/s", EXTRA))
    return cases


def lora_group(M: int = 512, K: int = 4096, N: int = 4096, r: int = 16, alpha: int = 32) -> list[Case]:
    """nn.LoraLinear on a Linear4bit, forward + backward (input and adapter gradients). On
    opencl the op layer sends the base layer to the device and keeps the adapter's small
    products in torch; the last entry runs those on the device too, through the backend's
    LoRA kernels (what a backend-dispatched LoRA op would call)."""
    from qlora_kernels.backends import opencl as backend

    torch.manual_seed(0)
    dense = torch.nn.Linear(K, N, bias=False)
    layer = qk.nn.LoraLinear(qk.nn.Linear4bit.from_linear(dense, "nf4", 64), r=r, lora_alpha=alpha)
    torch.nn.init.normal_(layer.lora_B, std=0.01)
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)
    g = f"opencl LoRA layer fwd+bwd M={M} {K}->{N} r={r}"
    flops = 2 * 2.0 * M * K * N

    def module_step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)

    base = layer.base_layer
    packed, absmax = base.weight, base.prepared().absmax

    def device_step():
        xd = x.detach()
        y, u = backend.lora_linear_4bit(xd, packed, absmax, 64, "nf4", N, layer.lora_A.detach(), layer.lora_B.detach(),
                                        layer.scaling, None, None)
        dx = backend.linear_4bit_grad_input(dy, packed, absmax, 64, "nf4", K)
        dA, dB, dx_lora = backend.lora_backward(dy, xd, u, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling,
                                                None, True)
        return y, dx + dx_lora, dA, dB

    return [
        Case(g, "opencl NDRange, LoraLinear (adapter in torch)", _on("opencl", module_step), True, flops, "GFLOP/s",
             EXTRA),
        Case(g, "opencl NDRange, adapter kernels on the device too", _on("opencl", device_step), True, flops,
             "GFLOP/s", EXTRA),
        Case(g, "cpu backend, LoraLinear", _on("cpu", module_step), False, flops, "GFLOP/s", EXTRA),
    ]


GROUPS = [linear_group(1, fpga=True), linear_group(512), lora_group()]
CASES = [c for grp in GROUPS for c in grp]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c.group}-{c.name}" for c in CASES])
def test_opencl(bench_case, i):
    c = CASES[i]
    rounds = 3 if "FPGA" in c.name else (15 if "M=1 " in c.group else 5)
    bench_case(c, rounds=rounds)
