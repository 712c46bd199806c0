// Scalar reference path of the fused 4-bit linear kernels: plain loops, one row (or row
// strip) of Wd decoded at a time. Every SIMD path is tested against it and it against
// the pure-torch reference; it is also what runs on non-x86 builds.
#include "linear4_common.h"

namespace qk {

void linear4_forward_scalar(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias,
                            float* y, int64_t ldy, int nthreads) {
  const int64_t N = w.N, K = w.K;
  if (M == 0 || N == 0) return;
  const int T = threads_for(N, nthreads);
  ScratchMeter meter;
  ScratchBuf rows(meter, T * K);
#pragma omp parallel num_threads(T)
  {
    float* row = rows.data() + thread_id() * K;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      decode_scalar(w, n * K, K, row);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * ldx;
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += xm[k] * row[k];
        y[m * ldy + n] = bias ? s + bias[n] : s;
      }
    }
  }
}

void linear4_backward_input_scalar(const float* dy, int64_t M, int64_t lddy, const Weight4& w, float* dx,
                                   int64_t lddx, int nthreads) {
  const int64_t N = w.N, K = w.K;
  if (M == 0 || K == 0) return;
  // Threads own column strips of dx, so each element of W is decoded once.
  constexpr int64_t kStrip = 256;
  const int64_t nstrips = ceil_div(K, kStrip);
  const int T = threads_for(nstrips, nthreads);
  ScratchMeter meter;
  ScratchBuf strips(meter, T * kStrip);
#pragma omp parallel num_threads(T)
  {
    float* seg = strips.data() + thread_id() * kStrip;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < nstrips; ++s) {
      const int64_t k0 = s * kStrip, kw = imin(kStrip, K - k0);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < kw; ++k) dx[m * lddx + k0 + k] = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        decode_scalar(w, n * K + k0, kw, seg);
        for (int64_t m = 0; m < M; ++m) {
          const float g = dy[m * lddy + n];
          float* d = dx + m * lddx + k0;
          for (int64_t k = 0; k < kw; ++k) d[k] += g * seg[k];
        }
      }
    }
  }
}

const char* linear4_plan_scalar(int64_t, const Weight4&, bool) { return "scalar"; }

}  // namespace qk
