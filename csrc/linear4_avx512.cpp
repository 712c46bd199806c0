// AVX-512 (F+BW+VL+DQ) path of the fused 4-bit linear layer: a 12x32 micro-kernel (24
// zmm accumulators of the 32 registers) under the shared loop nest of linear4_gemm.h,
// and the GEMV paths of linear4_gemv.h with 128-element chunks, where one vpermps is a
// whole 16-entry codebook lookup. Only chosen when cpuid reports all four extensions.
#include "linear4_gemm.h"
#include "linear4_gemv.h"

namespace qk {
namespace {

// GEMV/GEMM crossovers as in linear4_avx2.cpp, measured the same way. The 512-bit panel
// kernel is so fast that the backward GEMV only pays off for the tiniest batches.
constexpr int64_t kGemvRowsForward = 6;
constexpr int64_t kGemvRowsBackward = 3;

struct Kernel12x32 {
  static constexpr int MR = 12, NR = 32;
  // As for AVX2 (linear4_avx2.cpp): a 32 KiB micro-panel of B in L1, 120 KiB of packed
  // A in L2, the 1 MiB KC x NC panel in L2/L3.
  static constexpr int64_t KC = 256, NC = 1024, MC = 120;

  template <int R>
  static void kern(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int nr, const float* bias,
                   bool first) {
    __m512 c0[R], c1[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm512_setzero_ps();
      c1[r] = _mm512_setzero_ps();
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

// Z16 needs 128-element rows; rows of 64*odd elements still get the 256-bit GEMV.
const char* gemv_kind(int64_t M, const Weight4& w, bool backward) {
  if (M > (backward ? kGemvRowsBackward : kGemvRowsForward)) return nullptr;
  if (gemv_fits<Z16>(w)) return "gemv";
  if (gemv_fits<Y8>(w)) return "gemv-256";
  return nullptr;
}

}  // namespace

void linear4_forward_avx512(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias, float* y,
                            int64_t ldy, int nthreads) {
  if (M == 0 || w.N == 0) return;
  if (const char* g = gemv_kind(M, w, false)) {
    if (g[4] == '\0') return gemv_forward<Z16, kGemvRowsForward>(x, M, ldx, w, bias, y, ldy, nthreads);
    return gemv_forward<Y8, 4>(x, M, ldx, w, bias, y, ldy, nthreads);
  }
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float* tmp) {
    pack_forward_panel<Kernel12x32::NR>(w, j0, nc, p0, kc, bp, tmp);
  };
  gemm_driver<Kernel12x32>(M, w.N, w.K, x, ldx, y, ldy, bias, pack, nthreads);
}

void linear4_backward_input_avx512(const float* dy, int64_t M, int64_t lddy, const Weight4& w, float* dx,
                                   int64_t lddx, int nthreads) {
  if (M == 0 || w.K == 0) return;
  if (const char* g = gemv_kind(M, w, true)) {
    if (g[4] == '\0') return gemv_backward<Z16>(dy, M, lddy, w, dx, lddx, nthreads);
    return gemv_backward<Y8>(dy, M, lddy, w, dx, lddx, nthreads);
  }
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float*) {
    pack_backward_panel<Kernel12x32::NR>(w, j0, nc, p0, kc, bp);
  };
  gemm_driver<Kernel12x32>(M, w.K, w.N, dy, lddy, dx, lddx, nullptr, pack, nthreads);
}

const char* linear4_plan_avx512(int64_t M, const Weight4& w, bool backward) {
  const char* g = gemv_kind(M, w, backward);
  return g ? g : "gemm";
}

}  // namespace qk
