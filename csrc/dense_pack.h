// B-panel packing of the dense fp32 linear (dense.h) into the micro-panel layout of
// linear4_gemm.h: micro-panel q at bp + q * panel_stride(kc, NR), element (k, r) at
// k*NR + r, columns past the panel zero. ISA-flagged translation units only.
#pragma once
#include <cstring>

#include "dense.h"
#include "linear4_gemm.h"
#include "lora4_common.h"

namespace qk {
namespace {

// Forward (y = x W^T): bp[q*ps + k*NR + r] = W[n0 + q*NR + r, p0 + k]. Rows of W become
// columns of the panel, so 8x8 tiles are transposed in registers.
template <int NR>
void pack_dense_forward(const DenseWeight& w, int64_t n0, int64_t nc, int64_t p0, int64_t kc, float* bp) {
  static_assert(NR % 8 == 0, "rows are packed 8 at a time");
  const int64_t ps = panel_stride(kc, NR), kv = kc & ~int64_t(7);
  for (int64_t q = 0; q * NR < nc; ++q) {
    float* dst = bp + q * ps;
    for (int g = 0; g < NR / 8; ++g) {
      const int64_t r0 = q * NR + g * 8;
      const float* rows[8];
      int live = 0;
      for (int r = 0; r < 8; ++r) {
        const bool in = r0 + r < nc;
        rows[r] = in ? w.w + (n0 + r0 + r) * w.ld + p0 : nullptr;
        live += in;
      }
      if (live == 0) {
        for (int64_t k = 0; k < kc; ++k) _mm256_storeu_ps(dst + k * NR + g * 8, _mm256_setzero_ps());
        continue;
      }
      for (int64_t k = 0; k < kv; k += 8) {
        __m256 v[8];
        for (int r = 0; r < 8; ++r) v[r] = rows[r] ? _mm256_loadu_ps(rows[r] + k) : _mm256_setzero_ps();
        transpose8(v);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k + j) * NR + g * 8, v[j]);
      }
      for (int64_t k = kv; k < kc; ++k)
        for (int r = 0; r < 8; ++r) dst[k * NR + g * 8 + r] = rows[r] ? rows[r][k] : 0.f;
    }
  }
}

// Backward (dx = dy W): bp[q*ps + k*NR + r] = W[p0 + k, k0 + q*NR + r], a copy of row
// segments.
template <int NR>
void pack_dense_backward(const DenseWeight& w, int64_t k0, int64_t nc, int64_t p0, int64_t kc, float* bp) {
  const int64_t ps = panel_stride(kc, NR);
  for (int64_t q = 0; q * NR < nc; ++q) {
    const int64_t c0 = q * NR, cols = imin(NR, nc - c0);
    float* dst = bp + q * ps;
    const float* src = w.w + p0 * w.ld + k0 + c0;
    for (int64_t k = 0; k < kc; ++k, src += w.ld, dst += NR) {
      std::memcpy(dst, src, cols * sizeof(float));
      for (int64_t r = cols; r < NR; ++r) dst[r] = 0.f;
    }
  }
}

// Copying a panel of W costs about this many rows of micro-kernel work on it.
constexpr int64_t kDensePackRows = 4;

// The two entry points of an ISA path, for its micro-kernel UK (ukernel_*.h), with the
// cache blocking tuned for the fused 4-bit linear of that path (tuning.h): the loop nest
// is the same, only the panel fill is cheaper.
// Rows of x up to which the forward streams W once, row by row, instead of packing panels:
// at decode's one row the packed GEMM reads W and writes and reads its copy, and an output
// head ([vocab, hidden], 113 MB for SmolLM2) is then bound by that traffic
// (docs/benchmarks.md, "Native decode step").
constexpr int64_t kDenseGemvRows = 4;

// y[m, n] = <x[m], W[n]> (+ bias[n]) for M <= kDenseGemvRows: W's row n meets every row of x
// while in L1. The dot products are lora4_common.h's (fixed lanes and tree), so the AVX2
// and AVX-512 paths give the same bits for the same row (the scalar path, dense_scalar.cpp,
// has its own loop).
void dense_gemv(const float* x, int64_t M, int64_t ldx, const DenseWeight& w, const float* bias, float* y,
                int64_t ldy, int nthreads) {
  const int64_t N = w.N, K = w.K;
  // Below ~64K multiply-adds a parallel region costs more than it saves.
  [[maybe_unused]] const int T = N * K * M >= (int64_t(1) << 16) ? nthreads : 1;
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
  for (int64_t n = 0; n < N; ++n) {
    const float* row = w.w + n * w.ld;
    for (int64_t m = 0; m < M; ++m) {
      const float s = dot<false>(x + m * ldx, nullptr, row, K);
      y[m * ldy + n] = bias ? s + bias[n] : s;
    }
  }
}

template <class UK>
void dense_forward_with(const float* x, int64_t M, int64_t ldx, const DenseWeight& w, const float* bias, float* y,
                        int64_t ldy, const Blocking& bl, int nthreads) {
  if (M <= kDenseGemvRows) return dense_gemv(x, M, ldx, w, bias, y, ldy, nthreads);
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float*) {
    pack_dense_forward<UK::NR>(w, j0, nc, p0, kc, bp);
  };
  gemm_driver<UK>(M, w.N, w.K, x, ldx, y, ldy, bias, pack, bl, UK::NR, kDensePackRows, nthreads);
}

template <class UK>
void dense_backward_input_with(const float* dy, int64_t M, int64_t lddy, const DenseWeight& w, float* dx,
                               int64_t lddx, const Blocking& bl, int nthreads) {
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float*) {
    pack_dense_backward<UK::NR>(w, j0, nc, p0, kc, bp);
  };
  gemm_driver<UK>(M, w.K, w.N, dy, lddy, dx, lddx, nullptr, pack, bl, UK::NR, kDensePackRows, nthreads);
}

}  // namespace
}  // namespace qk
