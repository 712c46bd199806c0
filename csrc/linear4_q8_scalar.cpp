// Portable path of the int8-compute linear (linear4_q8.h): any shape, any blocksize,
// blocks straddling rows: what runs where no SIMD kernel fits.
#include <vector>

#include "dispatch.h"
#include "linear4_q8_common.h"

namespace qk {

void linear4_q8_forward_scalar(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias,
                               float* y, int64_t ldy, int nthreads) {
  const int64_t N = w.N, K = w.K, G = w.blocksize;
  std::vector<int8_t> xq(static_cast<size_t>(K));
  std::vector<float> sx(static_cast<size_t>(ceil_div(K, G)));
  for (int64_t m = 0; m < M; ++m) {
    quantize_x_groups(x + m * ldx, K, G, xq.data(), sx.data());
    const int8_t* xqd = xq.data();
    const float* sxd = sx.data();
    float* ym = y + m * ldy;
#pragma omp parallel for num_threads(threads_for(ceil_div(N, 16), nthreads)) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      // Segments end where the x group or the (flat) weight block ends.
      BlockCursor bc(n * K, w.blocksize);
      float acc = 0.f;
      int64_t k = 0;
      while (k < K) {
        const int64_t run = imin(bc.left, imin(G - k % G, K - k));
        int32_t dot = 0;
        for (int64_t u = 0; u < run; ++u) dot += int32_t(xqd[k + u]) * w.code8[nibble_at(w.packed, n * K + k + u)];
        acc += static_cast<float>(dot) * (w.absmax[bc.block] * sxd[k / G]);
        k += run;
        bc.advance(run, w.blocksize);
      }
      ym[n] = bias ? acc + bias[n] : acc;
    }
  }
}

namespace {

enum class Q8Path { Scalar, Avx2, Avx512Vnni };

Q8Path q8_path(const Weight4Q8& w) {
#if defined(QK_X86)
  if (current_isa() == Isa::Avx512Vnni && linear4_q8_avx512vnni_fits(w)) return Q8Path::Avx512Vnni;
  if (current_isa() != Isa::Scalar && linear4_q8_avx2_fits(w)) return Q8Path::Avx2;
#endif
  (void)w;
  return Q8Path::Scalar;
}

}  // namespace

const char* linear4_q8_plan(const Weight4Q8& w) {
  switch (q8_path(w)) {
    case Q8Path::Avx512Vnni: return "avx512-vnni";
    case Q8Path::Avx2: return "avx2";
    default: return "scalar";
  }
}

void linear4_q8_forward(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias, float* y,
                        int64_t ldy, int nthreads) {
  switch (q8_path(w)) {
#if defined(QK_X86)
    case Q8Path::Avx512Vnni: return linear4_q8_forward_avx512vnni(x, M, ldx, w, bias, y, ldy, nthreads);
    case Q8Path::Avx2: return linear4_q8_forward_avx2(x, M, ldx, w, bias, y, ldy, nthreads);
#endif
    default: return linear4_q8_forward_scalar(x, M, ldx, w, bias, y, ldy, nthreads);
  }
}

}  // namespace qk
