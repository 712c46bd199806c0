// Scalar path of the fused RMSNorm / SwiGLU: what builds without x86 run, and the
// element code every SIMD path's tail shares (norm_act_common.h).
#include "norm_act.h"
#include "norm_act_common.h"
#include "norm_act_simd.h"
#include "vec_scalar.h"

namespace qk {
namespace {

void rms_forward_row(const float* x, const float* w, int64_t K, float eps, float* y, float* rstd) {
  float ss = 0.0f;
  for (int64_t i = 0; i < K; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(K) + eps);
  *rstd = r;
  for (int64_t i = 0; i < K; ++i) y[i] = w[i] * (x[i] * r);
}

void rms_backward_row(const float* dy, const float* x, const float* w, float r, int64_t K, float* dx,
                      float* dw_acc) {
  float s = 0.0f;
  for (int64_t i = 0; i < K; ++i) s += dy[i] * w[i] * x[i];
  const float c = r * r * r / static_cast<float>(K) * s;
  for (int64_t i = 0; i < K; ++i) {
    dx[i] = r * (dy[i] * w[i]) - x[i] * c;
    if (dw_acc) dw_acc[i] += dy[i] * (x[i] * r);
  }
}

void swiglu_forward(const float* g, const float* u, int64_t n, float* h) {
  for (int64_t i = 0; i < n; ++i) swiglu_forward_elem(g[i], u[i], h[i]);
}

void swiglu_backward(const float* dh, const float* g, const float* u, int64_t n, float* dg, float* du) {
  for (int64_t i = 0; i < n; ++i) swiglu_backward_elem(dh[i], g[i], u[i], dg[i], du[i]);
}

void exp_range(const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = exp_scalar(x[i]);
}

}  // namespace

NormActKernels norm_act_scalar() {
  // the cross-entropy pass as the SIMD paths compute it, one lane wide
  return {rms_forward_row, rms_backward_row, swiglu_forward, swiglu_backward, exp_range, softmax_xent_row<VecScalar>};
}

}  // namespace qk
