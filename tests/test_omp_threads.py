"""OpenMP may run fewer threads than a parallel region asks for (OMP_DYNAMIC on a busy
machine, OMP_THREAD_LIMIT, a region nested in another one). Kernels that split work by
thread id then left the missing threads' share of the output unwritten (a 4-bit GEMM off
by 3.75); the peak probe counted work no thread did. Here a child process with OpenMP
capped at one thread must give the same bits as an uncapped one, on every path."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import native_paths

CHILD = r"""
import json, sys, torch
import qlora_kernels as qk
from qlora_kernels import _C, functional
torch.set_num_threads(2)
out = {}
for isa in sys.argv[1].split(","):
    _C.set_isa(isa)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(320, 512, generator=g) * 0.02
    p, s = functional.quantize_4bit(W, "nf4", 64)
    for M in (1, 7, 96):  # the GEMV, a few rows, the blocked GEMM
        x = torch.randn(M, 512, generator=g, requires_grad=True)
        y = functional.linear_4bit(x, p, s)
        y.backward(torch.ones_like(y))
        yi = functional.linear_4bit(x.detach(), p, s, compute="int8")
        ref = x.detach() @ functional.dequantize_4bit(p, s).t()
        out[f"{isa}-{M}"] = {"y": y.detach().flatten().tolist(), "dx": x.grad.flatten().tolist(),
                             "int8": yi.flatten().tolist(), "err": float((y - ref).abs().max())}
    out[f"{isa}-peak"] = [_C.fma_peak_gflops(isa, n, 0.05) for n in (1, 2)]
print(json.dumps(out))
"""


def _child(isas: list[str], **env) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    e.update(env, QLORA_KERNELS_TUNE="0", OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-c", CHILD, ",".join(isas)], env=e, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_fewer_openmp_threads_than_asked_give_the_same_bits():
    isas = native_paths()
    full, capped = _child(isas), _child(isas, OMP_THREAD_LIMIT="1")
    wrong = []
    for key, got in capped.items():
        if key.endswith("-peak"):
            one, two = got
            # one thread ran both slices: the rate of one thread, not twice it (noise allowed)
            if two >= 1.6 * one:
                wrong.append((key, got))
            continue
        wrong += [(key, "err", got["err"])] if got["err"] >= 1e-4 else []
        wrong += [(key, part) for part in ("y", "dx", "int8") if got[part] != full[key][part]]
    assert not wrong, wrong
