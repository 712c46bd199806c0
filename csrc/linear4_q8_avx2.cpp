// AVX2 path of the int8-compute linear (linear4_q8.h), for CPUs without AVX-512 VNNI.
// Per 64-element chunk (32 packed bytes): vpshufb looks the low and high nibbles up in the
// signed int8 codebook; vpmaddubsw needs an unsigned operand, so the codes go in as |code8|
// and x takes their signs (vpsignb), which keeps each pair sum within int16 (2 * 127 * 127
// < 2^15: +128-offset codes would saturate); vpmaddwd then adds pairs into 8 int32 lanes
// (lane j: elements 8j .. 8j+7, as on the AVX-512 path). The activation quantizer is the
// portable one (linear4_q8_common.h), so xq and sx are those of every other path.
#include <immintrin.h>

#include "linear4_q8_common.h"
#include "linear4_simd.h"

namespace qk {
namespace {

constexpr int64_t kChunk8 = 64;

// NB: blocks per chunk (1: blocks of >= 64 elements, 2: blocksize 32).
template <int NB>
float row_dot_avx2(const Weight4Q8& w, int64_t n, const int8_t* xlo, const int8_t* xhi, const float* sx,
                   __m256i tab) {
  const int64_t K = w.K, bs = w.blocksize;
  const int sh = __builtin_ctzll(static_cast<uint64_t>(bs));
  const bool pow2 = (bs & (bs - 1)) == 0;
  const auto blk = [=](int64_t i) { return pow2 ? (i >> sh) : i / bs; };
  const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const uint8_t* row = w.packed + n * K / 2;
  const int64_t i0 = n * K;
  __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
  for (int64_t c = 0; c < K; c += kChunk8) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c / 2));
    const __m256i clo = _mm256_shuffle_epi8(tab, _mm256_and_si256(raw, m4));
    const __m256i chi = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
    const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xlo + c / 2));
    const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xhi + c / 2));
    const __m256i plo = _mm256_maddubs_epi16(_mm256_sign_epi8(clo, clo), _mm256_sign_epi8(xl, clo));
    const __m256i phi = _mm256_maddubs_epi16(_mm256_sign_epi8(chi, chi), _mm256_sign_epi8(xh, chi));
    const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(plo, ones), _mm256_madd_epi16(phi, ones));
    const int64_t b = blk(i0 + c), g = c / bs;
    __m256 s;
    if (NB == 1) {
      s = _mm256_set1_ps(w.absmax[b] * sx[g]);
    } else {  // blocksize 32: lanes 0-3 and 4-7 have their own block and x group
      s = _mm256_setr_m128(_mm_set1_ps(w.absmax[b] * sx[g]), _mm_set1_ps(w.absmax[b + 1] * sx[g + 1]));
    }
    if ((c / kChunk8) & 1)
      f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), s, f1);
    else
      f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), s, f0);
  }
  return hsum(_mm256_add_ps(f0, f1));
}

}  // namespace

bool linear4_q8_avx2_fits(const Weight4Q8& w) {
  const int64_t bs = w.blocksize;
  // A chunk meets one block and one x group, or two of each at 32-element boundaries.
  return w.K % kChunk8 == 0 && (bs % kChunk8 == 0 || bs == 32);
}

void linear4_q8_forward_avx2(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias,
                             float* y, int64_t ldy, int nthreads) {
  const int64_t N = w.N, K = w.K, bs = w.blocksize;
  ScratchMeter meter;
  // xq (K bytes), xlo and xhi (K / 2 bytes each), then sx (one float per group).
  ScratchBuf buf(meter, K / 2 + ceil_div(K, bs));
  int8_t* xq = reinterpret_cast<int8_t*>(buf.data());
  int8_t* xlo = xq + K;
  int8_t* xhi = xlo + K / 2;
  float* sx = buf.data() + K / 2;
  alignas(32) int8_t t8[32];
  for (int j = 0; j < 32; ++j) t8[j] = w.code8[j % 16];
  const __m256i tab = _mm256_load_si256(reinterpret_cast<const __m256i*>(t8));
  for (int64_t m = 0; m < M; ++m) {
    quantize_x_groups(x + m * ldx, K, bs, xq, sx);
    for (int64_t t = 0; t < K / 2; ++t) {
      xhi[t] = xq[2 * t];
      xlo[t] = xq[2 * t + 1];
    }
    float* ym = y + m * ldy;
#pragma omp parallel for num_threads(threads_for(ceil_div(N, 16), nthreads)) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float d = bs == 32 ? row_dot_avx2<2>(w, n, xlo, xhi, sx, tab) : row_dot_avx2<1>(w, n, xlo, xhi, sx, tab);
      ym[n] = bias ? d + bias[n] : d;
    }
  }
}

}  // namespace qk
