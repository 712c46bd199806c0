// The AVX2 few-row forward with byte-shuffle decoding (linear4_avx2.cpp only). The
// 16-entry fp32 lookup of linear4_simd.h costs two vpermps and a blend per 8 weights on
// AVX2, and vpermps throughput is what bounded the one-row product on the AVX2-only AMD
// EPYC measured (Zen 3; docs/benchmarks.md). Here a chunk's 64 codes are looked up as
// bytes instead: vpshufb of its 32 high and 32 low nibbles in each of the 4 byte planes of
// the fp32 codebook, then two rounds of byte and word unpacking assemble the fp32 values
// (24 in-lane shuffles per 64 weights, on ports that issue two a cycle). The values come
// out in a fixed permutation of the chunk (shuf_element), which x is put in once per call.
//
// Blocks must cover whole chunks (blocksize % 64 == 0): a chunk's products are summed
// unscaled and scaled once by its block's absmax, within the fp32 dot-product bound.
#pragma once
#include <cstring>

#include "linear4_gemv.h"

namespace qk {
namespace {

// Byte b of code[c] at index c of each 128-bit lane of plane b.
struct ShufTab {
  __m256i plane[4];
  explicit ShufTab(const float* code) {
    alignas(32) uint8_t p[4][32];
    for (int c = 0; c < 16; ++c) {
      uint32_t bits;
      std::memcpy(&bits, code + c, 4);
      for (int b = 0; b < 4; ++b) p[b][c] = p[b][c + 16] = static_cast<uint8_t>(bits >> (8 * b));
    }
    for (int b = 0; b < 4; ++b) plane[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(p[b]));
  }
};

// The chunk element that decoded position pos (0..63) holds: positions 0..31 come from
// the high nibbles (even elements), 32..63 from the low ones; within each half, vector f
// (8 positions) lane L (4 positions) lane element j reads byte 16L + 4f + j.
constexpr int64_t shuf_element(int64_t pos) {
  const int64_t v = pos / 32, f = (pos % 32) / 8, L = (pos % 8) / 4, j = pos % 4;
  return 2 * (16 * L + 4 * f + j) + v;
}

// Codes of the 32 elements whose nibbles idx holds (bytes 0..15), as 4 fp32 vectors.
inline void shuf_decode32(__m256i idx, const ShufTab& t, __m256* out) {
  const __m256i b0 = _mm256_shuffle_epi8(t.plane[0], idx), b1 = _mm256_shuffle_epi8(t.plane[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(t.plane[2], idx), b3 = _mm256_shuffle_epi8(t.plane[3], idx);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

// xp[m][c + pos] = x[m][c + shuf_element(pos)].
inline void shuf_permute_x(const float* x, int64_t M, int64_t ldx, int64_t K, float* xp) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += 64)
      for (int64_t pos = 0; pos < 64; ++pos) xp[m * K + c + pos] = x[m * ldx + c + shuf_element(pos)];
}

// out[m] = sum_k xp[m][k] * Wd[n, k] for MB rows of x.
template <int MB>
void shuf_row(const ShufTab& t, const float* xp, const Weight4& w, const BlockIndex& bi, int64_t n, float* out) {
  const int64_t K = w.K;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[MB][2];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < K; c += 64) {
    const uint64_t i = static_cast<uint64_t>(n * K + c);
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.packed + i / 2));
    __m256 v[8];
    shuf_decode32(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), t, v);
    shuf_decode32(_mm256_and_si256(raw, low4), t, v + 4);
    const __m256 s = _mm256_set1_ps(w.absmax[bi(static_cast<int64_t>(i))]);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const float* xm = xp + m * K + c;
      __m256 p0 = _mm256_mul_ps(v[0], _mm256_loadu_ps(xm));
      __m256 p1 = _mm256_mul_ps(v[1], _mm256_loadu_ps(xm + 8));
#pragma GCC unroll 8
      for (int f = 2; f < 8; f += 2) {
        p0 = _mm256_fmadd_ps(v[f], _mm256_loadu_ps(xm + 8 * f), p0);
        p1 = _mm256_fmadd_ps(v[f + 1], _mm256_loadu_ps(xm + 8 * f + 8), p1);
      }
      acc[m][0] = _mm256_fmadd_ps(p0, s, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(p1, s, acc[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) out[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}

template <int MB>
void shuf_rows(int mb, const ShufTab& t, const float* xp, const Weight4& w, const BlockIndex& bi, int64_t n,
               float* out) {
  if constexpr (MB > 1) {
    if (mb < MB) return shuf_rows<MB - 1>(mb, t, xp, w, bi, n, out);
  }
  shuf_row<MB>(t, xp, w, bi, n, out);
}

inline bool shuf_fits(const Weight4& w) { return w.K % 64 == 0 && w.blocksize % 64 == 0; }

// y = x Wd^T (+ bias) for few rows of x (shuf_fits(w) holds).
template <int MBMAX>
void shuf_forward(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias, float* y, int64_t ldy,
                  int nthreads) {
  const ShufTab t(w.code);
  const BlockIndex bi(w.blocksize);
  gemv_forward_with<MBMAX>(x, M, ldx, w, bias, y, ldy, nthreads, shuf_permute_x,
                           [&](int mb, const float* xp, int64_t n, float* out) {
                             shuf_rows<MBMAX>(mb, t, xp, w, bi, n, out);
                           });
}

}  // namespace
}  // namespace qk
