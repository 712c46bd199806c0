// AVX2+FMA path of the fused 4-bit linear layer: a 6x16 micro-kernel (12 ymm
// accumulators, 2 B loads + 6 broadcasts per k) under the shared loop nest of
// linear4_gemm.h, and the dword-order GEMV paths of linear4_gemv.h for few rows.
#include "linear4_gemm.h"
#include "linear4_gemv.h"

namespace qk {
namespace {

// Rows of x/dy up to which the streaming GEMV beats decode-into-panels + micro-kernel,
// from per-call CPU time on 4096x4096, blocksize 64 (Zen 5; the crossover is where the
// GEMV's repeated passes over x/accumulators cost more than writing a decoded panel).
constexpr int64_t kGemvRowsForward = 8;
constexpr int64_t kGemvRowsBackward = 8;

// The "#pragma GCC unroll" on every loop over the accumulator arrays is load-bearing:
// see linear4_gemv.h (with -fopenmp GCC kept them on the stack otherwise).
struct Kernel6x16 {
  static constexpr int MR = 6, NR = 16;
  // One 16 KiB KC x NR micro-panel of B stays in L1 across the MC/MR micro-kernel calls
  // that reuse it; the MC x KC block of packed A (120 KiB) stays in L2; the KC x NC
  // panel (512 KiB) is read from L2/L3 once per MC block. Larger NC means fewer
  // re-packs of A (once per NC columns); the measured optimum is flat from 256 to 2048.
  static constexpr int64_t KC = 256, NC = 512, MC = 120;

  template <int R>
  static void kern(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int nr, const float* bias,
                   bool first) {
    __m256 c0[R], c1[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      c0[r] = _mm256_setzero_ps();
      c1[r] = _mm256_setzero_ps();
    }
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

bool use_gemv(int64_t M, const Weight4& w, bool backward) {
  return M <= (backward ? kGemvRowsBackward : kGemvRowsForward) && gemv_fits<Y8>(w);
}

}  // namespace

void linear4_forward_avx2(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias, float* y,
                          int64_t ldy, int nthreads) {
  if (M == 0 || w.N == 0) return;
  if (use_gemv(M, w, false)) return gemv_forward<Y8, 4>(x, M, ldx, w, bias, y, ldy, nthreads);
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float* tmp) {
    pack_forward_panel<Kernel6x16::NR>(w, j0, nc, p0, kc, bp, tmp);
  };
  gemm_driver<Kernel6x16>(M, w.N, w.K, x, ldx, y, ldy, bias, pack, nthreads);
}

void linear4_backward_input_avx2(const float* dy, int64_t M, int64_t lddy, const Weight4& w, float* dx,
                                 int64_t lddx, int nthreads) {
  if (M == 0 || w.K == 0) return;
  if (use_gemv(M, w, true)) return gemv_backward<Y8>(dy, M, lddy, w, dx, lddx, nthreads);
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float*) {
    pack_backward_panel<Kernel6x16::NR>(w, j0, nc, p0, kc, bp);
  };
  gemm_driver<Kernel6x16>(M, w.K, w.N, dy, lddy, dx, lddx, nullptr, pack, nthreads);
}

const char* linear4_plan_avx2(int64_t M, const Weight4& w, bool backward) {
  return use_gemv(M, w, backward) ? "gemv" : "gemm";
}

}  // namespace qk
