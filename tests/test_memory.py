"""A QLoRA layer's forward+backward never materializes its fp32 weight: peak memory
beyond activations and gradients stays under a quarter of an fp32 copy of the weight."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, resource, gc
    import torch
    import qlora_kernels as qk
    from qlora_kernels import _C, formats
    torch.set_num_threads(2)
    N = K = 4096; M = 512; r = 16
    # Packed bytes and absmax made directly: no fp32 weight ever exists in this process.
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, ((N * K) // 2, 1), dtype=torch.uint8, generator=g)
    absmax = torch.rand(N * K // 64, generator=g) * 0.1 + 0.01
    state = qk.QuantState(absmax=absmax, shape=torch.Size([N, K]), code=formats.codebook("nf4"),
                          blocksize=64, quant_type="nf4", dtype=torch.float32)
    A = (torch.randn(r, K) * 0.01).requires_grad_()
    B = (torch.randn(N, r) * 0.01).requires_grad_()
    def step(m):
        x = torch.randn(m, K, requires_grad=True)
        y = qk.lora_linear_4bit(x, packed, state, A, B, 2.0)
        y.backward(torch.ones_like(y))
        return x, y
    step(8)  # warm-up: thread pools, kernels, autograd machinery
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)
    gc.collect()
    if hasattr(_C, "linear4_reset_peak_scratch"):
        _C.linear4_reset_peak_scratch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    y = qk.lora_linear_4bit(x, packed, state, A, B, 2.0)
    y.backward(dy)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    scratch = _C.linear4_peak_scratch_bytes() if hasattr(_C, "linear4_peak_scratch_bytes") else None
    print(json.dumps({"growth": after - before, "scratch": scratch,
                      "act": (y.numel() + x.grad.numel()) * 4, "weight_fp32": N * K * 4}))
""")


def test_qlora_layer_peak_memory_stays_below_a_quarter_weight():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    quarter = m["weight_fp32"] // 4
    # The outputs (y, dx) and the backward's temporaries of the same size (the LoRA
    # branch's share of dx and their sum) are activations/gradients; anything beyond
    # them plus a quarter of the weight would mean a (partly) materialized weight.
    allowance = 2 * m["act"] + quarter
    assert m["growth"] <= allowance, m
    assert m["scratch"] is not None, "the extension does not report its scratch use"
    assert m["scratch"] <= quarter, m
