// Scalar path of the dense fp32 linear (dense.h), and the per-ISA table. Plain loops: every
// SIMD path is tested against it and it against the pure-torch reference; it is also what
// runs on non-x86 builds.
#include "dense.h"
#include "dispatch.h"
#include "linear4_common.h"

namespace qk {

void dense_forward_scalar(const float* x, int64_t M, int64_t ldx, const DenseWeight& w, const float* bias, float* y,
                          int64_t ldy, int nthreads) {
  const int64_t N = w.N, K = w.K;
  if (M == 0 || N == 0) return;
  [[maybe_unused]] const int T = threads_for(N, nthreads);
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* row = w.w + n * w.ld;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xm[k] * row[k];
      y[m * ldy + n] = bias ? s + bias[n] : s;
    }
  }
}

void dense_backward_input_scalar(const float* dy, int64_t M, int64_t lddy, const DenseWeight& w, float* dx,
                                 int64_t lddx, int nthreads) {
  const int64_t N = w.N, K = w.K;
  if (M == 0 || K == 0) return;
  // Threads own column strips of dx: no two write the same element.
  constexpr int64_t kStrip = 256;
  const int64_t nstrips = ceil_div(K, kStrip);
  [[maybe_unused]] const int T = threads_for(nstrips, nthreads);
#pragma omp parallel for num_threads(T) schedule(static)
  for (int64_t s = 0; s < nstrips; ++s) {
    const int64_t k0 = s * kStrip, kw = imin(kStrip, K - k0);
    for (int64_t m = 0; m < M; ++m) {
      float* d = dx + m * lddx + k0;
      for (int64_t k = 0; k < kw; ++k) d[k] = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const float g = dy[m * lddy + n];
        const float* row = w.w + n * w.ld + k0;
        for (int64_t k = 0; k < kw; ++k) d[k] += g * row[k];
      }
    }
  }
}

namespace {
const DenseKernels kScalar{dense_forward_scalar, dense_backward_input_scalar};
#if defined(QK_X86)
const DenseKernels kAvx2{dense_forward_avx2, dense_backward_input_avx2};
const DenseKernels kAvx512{dense_forward_avx512, dense_backward_input_avx512};
#endif
}  // namespace

const DenseKernels& dense_kernels() {
#if defined(QK_X86)
  return for_current_isa(kScalar, kAvx2, kAvx512);
#else
  return for_current_isa(kScalar, kScalar, kScalar);
#endif
}

}  // namespace qk
