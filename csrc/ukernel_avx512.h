// The AVX-512 fp32 micro-kernel (12x32: 24 zmm accumulators of the 32 registers) shared by
// the many-row loop nest of linear4_gemm.h: the fused 4-bit linear (linear4_avx512.cpp)
// and the dense fp32 linear (dense_avx512.cpp) differ only in how they fill the B panels.
// For AVX-512-flagged translation units only.
#pragma once
#include "linear4_gemm.h"

namespace qk {
namespace {

struct Kernel12x32 {
  // Cache blocking: tuning.h (run-time, calibrated per machine).
  static constexpr int MR = 12, NR = 32;

  template <int R>
  static void kern(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int nr, const float* bias,
                   bool first) {
    __m512 c0[R], c1[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm512_setzero_ps();
      c1[r] = _mm512_setzero_ps();
    }
    // Ask for the C tile's lines now, as the AVX2 kernel does (ukernel_avx2.h): they are read
    // and written right after the loop, and at M=512 4096x4096 the C block revisited once
    // per KC block lives in L3, not L2. On a Zen 5 (full-width AVX-512, where the loop
    // itself runs twice as fast as on Zen 4) the 4-bit forward went from ~410 to ~440
    // GFLOP/s (+1..+9% over 6 alternating pairs, one pair -2%); SmolLM2's shapes, whose C
    // fits L2, unchanged within noise. The Xeon of ukernel_avx2.h's note showed no change.
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 16), _MM_HINT_T0);
    }
    for (int64_t k = 0; k < kc; ++k) {
      const __m512 b0 = _mm512_load_ps(b + k * NR), b1 = _mm512_load_ps(b + k * NR + 16);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(a[k * MR + r]);
        c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
        c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
      }
    }
    // Masks cover the column tail; masked lanes are never read or written.
    const __mmask16 k0 = nr >= 16 ? __mmask16(0xffff) : __mmask16((1u << nr) - 1);
    const __mmask16 k1 = nr >= 32 ? __mmask16(0xffff) : nr > 16 ? __mmask16((1u << (nr - 16)) - 1) : __mmask16(0);
    const __m512 z = _mm512_setzero_ps();
    const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(k0, bias) : z;
    const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(k1, bias + 16) : z;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      float* cr = c + r * ldc;
      const __m512 o0 = first ? bias0 : _mm512_maskz_loadu_ps(k0, cr);
      const __m512 o1 = first ? bias1 : _mm512_maskz_loadu_ps(k1, cr + 16);
      _mm512_mask_storeu_ps(cr, k0, _mm512_add_ps(c0[r], o0));
      _mm512_mask_storeu_ps(cr + 16, k1, _mm512_add_ps(c1[r], o1));
    }
  }

  template <int R = MR>
  static void run_rows(int mr, int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int nr,
                       const float* bias, bool first) {
    if constexpr (R > 1) {
      if (mr < R) return run_rows<R - 1>(mr, kc, a, b, c, ldc, nr, bias, first);
    }
    kern<R>(kc, a, b, c, ldc, nr, bias, first);
  }

  static void run(int mr, int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int nr,
                  const float* bias, bool first) {
    run_rows(mr, kc, a, b, c, ldc, nr, bias, first);
  }
};

}  // namespace
}  // namespace qk
