// qlora-kernels: the fused RMSNorm and SwiGLU of a Llama-style decoder layer, with their
// backward, torch-free; and the softmax / cross-entropy row pass of the fused loss. Each ISA path fills one table of row/range kernels; the bindings
// (norm_act_bindings.cpp) split rows over threads and pick the table with current_isa().
//
//   rms_norm:  rstd = 1 / sqrt(sum(x^2) / K + eps),  y = w * (x * rstd)      (one row of K)
//   backward:  dx = rstd * (dy*w) - x * (rstd^3 / K * sum(dy*w*x)),  dw += dy * (x * rstd)
//   swiglu:    h = g / (1 + exp(-g)) * u                                    (silu(g) * u)
//   backward:  s = 1 / (1 + exp(-g)),  dg = (dh*u) * s * (1 + g*(1 - s)),  du = dh * silu(g)
//
// The order of operations is transformers' LlamaRMSNorm and torch's silu / silu_backward,
// so the only differences from torch in fp32 are the summation order and the exp (below).
#pragma once
#include <cstdint>

namespace qk {

struct NormActKernels {
  void (*rms_forward_row)(const float* x, const float* w, int64_t K, float eps, float* y, float* rstd);
  // dw_acc: this thread's running sum of dy * x * rstd, or null when dweight is not wanted
  void (*rms_backward_row)(const float* dy, const float* x, const float* w, float rstd, int64_t K, float* dx,
                           float* dw_acc);
  void (*swiglu_forward)(const float* g, const float* u, int64_t n, float* h);
  void (*swiglu_backward)(const float* dh, const float* g, const float* u, int64_t n, float* dg, float* du);
  void (*exp)(const float* x, int64_t n, float* y);  // the exp the SwiGLU kernels use, for tests
  // The cross-entropy of one row of logits z[n] against class `label`: returns
  // logsumexp(z) - z[label] and overwrites z with its gradient softmax(z) - onehot(label);
  // label < 0 (an ignored row): z zeroed, 0 returned.
  float (*softmax_xent_row)(float* z, int64_t n, int64_t label);
};

NormActKernels norm_act_scalar();
#if defined(QK_X86)
NormActKernels norm_act_avx2();
NormActKernels norm_act_avx512();
#endif

const NormActKernels& norm_act_kernels();  // the current ISA path (dispatch.h)

}  // namespace qk
