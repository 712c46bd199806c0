// The AVX2+FMA fp32 micro-kernel (6x16: 12 ymm accumulators, 2 B loads + 6 broadcasts per
// k) shared by the many-row loop nest of linear4_gemm.h: the fused 4-bit linear
// (linear4_avx2.cpp) and the dense fp32 linear (dense_avx2.cpp) differ only in how they
// fill the B panels. For AVX2-flagged translation units only.
#pragma once
#include "linear4_gemm.h"

namespace qk {
namespace {

// The "#pragma GCC unroll" on every loop over the accumulator arrays is load-bearing:
// see linear4_gemv.h (with -fopenmp GCC kept them on the stack otherwise).
struct Kernel6x16 {
  // Cache blocking: tuning.h (run-time, calibrated per machine).
  static constexpr int MR = 6, NR = 16;

  template <int R>
  static void kern(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int nr, const float* bias,
                   bool first) {
    __m256 c0[R], c1[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm256_setzero_ps();
      c1[r] = _mm256_setzero_ps();
    }
    // The C tile is read and written right after the loop: ask for its lines now. Under the
    // AVX2 pairing on an AVX-512 Xeon, M=512 4096x4096 went from 80% to 87% of the AVX2 FMA
    // peak (211 -> 231 GFLOP/s, 3 alternating pairs); the AVX-512 kernel showed no change
    // beyond noise and is left as it was.
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    for (int64_t k = 0; k < kc; ++k) {
      const __m256 b0 = _mm256_load_ps(b + k * NR), b1 = _mm256_load_ps(b + k * NR + 8);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256 av = _mm256_broadcast_ss(a + k * MR + r);
        c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
        c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
      }
    }
    if (nr == NR) {
      const __m256 z = _mm256_setzero_ps();
      const __m256 bias0 = bias ? _mm256_loadu_ps(bias) : z, bias1 = bias ? _mm256_loadu_ps(bias + 8) : z;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        float* cr = c + r * ldc;
        const __m256 o0 = first ? bias0 : _mm256_loadu_ps(cr), o1 = first ? bias1 : _mm256_loadu_ps(cr + 8);
        _mm256_storeu_ps(cr, _mm256_add_ps(c0[r], o0));
        _mm256_storeu_ps(cr + 8, _mm256_add_ps(c1[r], o1));
      }
      return;
    }
    // Column tail: masked loads/stores never touch memory past column nr.
    const __m256i cut = _mm256_set1_epi32(nr);
    const __m256i m0 = _mm256_cmpgt_epi32(cut, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i m1 = _mm256_cmpgt_epi32(cut, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
    const __m256 z = _mm256_setzero_ps();
    const __m256 bias0 = bias ? _mm256_maskload_ps(bias, m0) : z, bias1 = bias ? _mm256_maskload_ps(bias + 8, m1) : z;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      float* cr = c + r * ldc;
      const __m256 o0 = first ? bias0 : _mm256_maskload_ps(cr, m0);
      const __m256 o1 = first ? bias1 : _mm256_maskload_ps(cr + 8, m1);
      _mm256_maskstore_ps(cr, m0, _mm256_add_ps(c0[r], o0));
      _mm256_maskstore_ps(cr + 8, m1, _mm256_add_ps(c1[r], o1));
    }
  }

  static void run(int mr, int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int nr,
                  const float* bias, bool first) {
    switch (mr) {
      case 6: return kern<6>(kc, a, b, c, ldc, nr, bias, first);
      case 5: return kern<5>(kc, a, b, c, ldc, nr, bias, first);
      case 4: return kern<4>(kc, a, b, c, ldc, nr, bias, first);
      case 3: return kern<3>(kc, a, b, c, ldc, nr, bias, first);
      case 2: return kern<2>(kc, a, b, c, ldc, nr, bias, first);
      default: return kern<1>(kc, a, b, c, ldc, nr, bias, first);
    }
  }
};

}  // namespace
}  // namespace qk
