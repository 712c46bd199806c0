"""DoRA's weight norm, ||W + s·B·A|| per output row, without materializing W in fp32.

    ||W_n + s (BA)_n||² = ||W_n||² + 2s · Σ_j B[n,j] (W Aᵀ)[n,j] + s² · B_n (A Aᵀ) B_nᵀ

||W_n||² is fixed for a frozen base and computed once (decoded in row chunks); W Aᵀ is one
4-bit GEMM with the r rows of A as its input, so the per-step cost is a rank-r product
instead of PEFT's full dequantization. The norm is a constant for autograd (DoRA paper,
section 4.3), so everything here runs without gradients."""
from __future__ import annotations

import math

import torch

from . import backends
from .backends import reference
from .nn import Linear4bit

_CHUNK_ELEMENTS = 1 << 20  # 4 MB of fp32 per decoded chunk


def base_row_sq_norms(base: torch.nn.Module) -> torch.Tensor:
    """Σ_k W[n,k]² in fp64 for a Linear4bit (kept with the layer's prepared weight, so it
    goes when the weight changes) or a dense nn.Linear."""
    if not isinstance(base, Linear4bit):
        return base.weight.detach().double().pow(2).sum(1)
    prep = base.prepared()
    if "row_sq_norms" in prep.derived:
        return prep.derived["row_sq_norms"]
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():  # dynamo refuses the query
        with torch.inference_mode(False):  # kept for later calls in grad mode too: a normal tensor (prepared.py)
            return base_row_sq_norms(base)
    N, K = base.out_features, base.in_features
    bs = base.blocksize
    # A chunk must start on a block boundary and on a whole byte.
    step = math.lcm(bs, 2) // math.gcd(math.lcm(bs, 2), K)
    rows = max(step, (_CHUNK_ELEMENTS // max(K, 1)) // step * step)
    absmax = prep.absmax
    out = torch.empty(N, dtype=torch.float64)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        e0, e1 = r0 * K, r1 * K
        packed = base.weight.reshape(-1)[e0 // 2:(e1 + 1) // 2]
        ab = absmax[e0 // bs:-(-e1 // bs)]
        chunk = torch.ops.qlora_kernels.dequantize_4bit(packed, ab, bs, base.quant_type, [r1 - r0, K], torch.float32)
        out[r0:r1] = chunk.double().pow(2).sum(1)
    prep.derived["row_sq_norms"] = out
    return out


@torch.no_grad()
def weight_norm(base: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms of W + scaling · B·A (fp32, detached): for a 4-bit base, the selected
    backend's ``dora_weight_norm`` kernel (backends/reference.py defines it)."""
    A = lora_A.detach().float()
    if isinstance(base, Linear4bit):
        prep = base.prepared()
        return backends.run("dora_weight_norm", prep.packed, prep.absmax, prep.blocksize, prep.quant_type,
                            prep.out_features, prep.in_features, A, lora_B.detach().float(), float(scaling),
                            base_row_sq_norms(base))
    return dense_weight_norm(base.weight, lora_A, lora_B, scaling)


@torch.no_grad()
def dense_weight_norm(W: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms of W + scaling · B·A for a dense W [N, K] (fp32, detached)."""
    W, A = W.detach(), lora_A.detach().float()
    WAt = A @ W.float().t()  # [r, N]
    return reference.dora_norm_from_parts(W.double().pow(2).sum(1), WAt, A, lora_B.detach(), scaling)
