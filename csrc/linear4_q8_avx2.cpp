// AVX2 path of the int8-compute linear (linear4_q8.h), for CPUs without AVX-512 VNNI.
// Per 64-element chunk (32 packed bytes): vpshufb looks the low and high nibbles up in the
// signed int8 codebook; vpmaddubsw needs an unsigned operand, so the codes go in as |code8|
// and x takes their signs (vpsignb), which keeps each pair sum within int16 (2 * 127 * 127
// < 2^15: +128-offset codes would saturate); vpmaddwd then adds pairs into 8 int32 lanes
// (lane j: elements 8j .. 8j+7, as on the AVX-512 path). The activation quantizer is the
// portable one (linear4_q8_common.h), so xq and sx are those of every other path. For
// more than one row of x, each chunk of W is looked up once for groups of 4 rows.
#include <immintrin.h>

#include "linear4_q8_common.h"
#include "linear4_simd.h"

namespace qk {
namespace {

constexpr int64_t kChunk8 = 64;

// Quantized rows of x: xlo/xhi K / 2 bytes per row, sx one float per group per row.
struct XRows8 {
  const int8_t *lo, *hi;
  const float* sx;
  int64_t half, groups;  // row strides
};

// out[r] = weight row n . row m0 + r of x, for R rows of x sharing every lookup of W.
// NB: blocks per chunk (1: blocks of >= 64 elements, 2: blocksize 32).
template <int NB, int R>
void rows_dot_avx2(const Weight4Q8& w, int64_t n, const XRows8& xs, int64_t m0, __m256i tab, float* out) {
  const int64_t K = w.K, bs = w.blocksize;
  const int sh = __builtin_ctzll(static_cast<uint64_t>(bs));
  const bool pow2 = (bs & (bs - 1)) == 0;
  const auto blk = [=](int64_t i) { return pow2 ? (i >> sh) : i / bs; };
  const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const uint8_t* row = w.packed + n * K / 2;
  const int64_t i0 = n * K;
  __m256 f[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) f[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < K; c += kChunk8) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c / 2));
    const __m256i clo = _mm256_shuffle_epi8(tab, _mm256_and_si256(raw, m4));
    const __m256i chi = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
    const __m256i alo = _mm256_sign_epi8(clo, clo), ahi = _mm256_sign_epi8(chi, chi);
    const int64_t b = blk(i0 + c), g = c / bs;
    const float a0 = w.absmax[b], a1 = NB == 1 ? a0 : w.absmax[b + 1];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs.lo + m * xs.half + c / 2));
      const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs.hi + m * xs.half + c / 2));
      const __m256i plo = _mm256_maddubs_epi16(alo, _mm256_sign_epi8(xl, clo));
      const __m256i phi = _mm256_maddubs_epi16(ahi, _mm256_sign_epi8(xh, chi));
      const __m256i acc = _mm256_add_epi32(_mm256_madd_epi16(plo, ones), _mm256_madd_epi16(phi, ones));
      const float* sx = xs.sx + m * xs.groups;
      // blocksize 32: lanes 0-3 and 4-7 have their own block and x group
      const __m256 s = NB == 1 ? _mm256_set1_ps(a0 * sx[g])
                               : _mm256_setr_m128(_mm_set1_ps(a0 * sx[g]), _mm_set1_ps(a1 * sx[g + 1]));
      f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, f[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) out[r] = hsum(f[r]);
}

template <int NB>
void rows_dot_avx2_any(int rows, const Weight4Q8& w, int64_t n, const XRows8& xs, int64_t m0, __m256i tab,
                       float* out) {
  for (; rows >= 4; rows -= 4, m0 += 4, out += 4) rows_dot_avx2<NB, 4>(w, n, xs, m0, tab, out);
  for (; rows > 0; --rows, ++m0, ++out) rows_dot_avx2<NB, 1>(w, n, xs, m0, tab, out);
}

}  // namespace

bool linear4_q8_avx2_fits(const Weight4Q8& w) {
  const int64_t bs = w.blocksize;
  // A chunk meets one block and one x group, or two of each at 32-element boundaries.
  return w.K % kChunk8 == 0 && (bs % kChunk8 == 0 || bs == 32);
}

// Tiles of kTileRows rows of x are quantized together; each thread takes a range of
// weight rows in L2-sized blocks of kBlockN and runs them against groups of 4 rows of x.
constexpr int64_t kTileRows8 = 64, kBlockN8 = 256;

void linear4_q8_forward_avx2(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias,
                             float* y, int64_t ldy, int nthreads) {
  const int64_t N = w.N, K = w.K, bs = w.blocksize, ng = ceil_div(K, bs);
  const int64_t mt_max = imin(kTileRows8, M);
  ScratchMeter meter;
  // Per row: xq (K bytes), xlo and xhi (K / 2 bytes each), then sx (one float per group).
  ScratchBuf buf(meter, mt_max * (K / 2 + ng));
  int8_t* xq = reinterpret_cast<int8_t*>(buf.data());
  int8_t* xlo = xq + mt_max * K;
  int8_t* xhi = xlo + mt_max * (K / 2);
  float* sx = buf.data() + mt_max * (K / 2);
  const XRows8 xs{xlo, xhi, sx, K / 2, ng};
  alignas(32) int8_t t8[32];
  for (int j = 0; j < 32; ++j) t8[j] = w.code8[j % 16];
  const __m256i tab = _mm256_load_si256(reinterpret_cast<const __m256i*>(t8));
  const int T = threads_for(ceil_div(N, 16), nthreads);
  for (int64_t m0 = 0; m0 < M; m0 += kTileRows8) {
    const int64_t mt = imin(kTileRows8, M - m0);
    for (int64_t r = 0; r < mt; ++r) {
      int8_t* q = xq + r * K;
      quantize_x_groups(x + (m0 + r) * ldx, K, bs, q, sx + r * ng);
      for (int64_t t = 0; t < K / 2; ++t) {
        xhi[r * (K / 2) + t] = q[2 * t];
        xlo[r * (K / 2) + t] = q[2 * t + 1];
      }
    }
#pragma omp parallel num_threads(T)
    {
      const int64_t t = thread_id(), nb = N * t / T, ne = N * (t + 1) / T;
      float d[4];
      for (int64_t n0 = nb; n0 < ne; n0 += kBlockN8) {
        for (int64_t g = 0; g < mt; g += 4) {
          const int rows = static_cast<int>(imin(4, mt - g));
          for (int64_t n = n0; n < imin(ne, n0 + kBlockN8); ++n) {
            if (bs == 32)
              rows_dot_avx2_any<2>(rows, w, n, xs, g, tab, d);
            else
              rows_dot_avx2_any<1>(rows, w, n, xs, g, tab, d);
            for (int r = 0; r < rows; ++r) y[(m0 + g + r) * ldy + n] = bias ? bias[n] + d[r] : d[r];
          }
        }
      }
    }
  }
}

}  // namespace qk
