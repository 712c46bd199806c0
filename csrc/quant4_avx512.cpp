// AVX-512 (F+BW+VL+DQ) dequantization to fp32. One vpermps is a whole 16-entry lookup, and
// the block's absmax is folded into the 16-entry table once per block (code * absmax,
// rounded once, as the scalar rule computes every element), so each 16 outputs cost a
// byte shuffle, a widening, a shift and a lookup; the AVX2 path needs ~4x the work and ran
// at half the memory bandwidth here. Other output dtypes and the quantizer stay on the
// AVX2 path (dispatch.cpp).
#include <immintrin.h>

#include <cstdint>

#include "quant4_common.h"

namespace qk {
namespace {

// 16 nibble indices of 8 packed bytes in element order (even element = high nibble), one
// per dword; bits above 3 are left as garbage: vpermps reads only bits 0-3.
inline __m512i indices16(const uint8_t* p) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i dup = _mm_shuffle_epi8(raw, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
  const __m512i shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  return _mm512_srlv_epi32(_mm512_cvtepu8_epi32(dup), shifts);
}

template <bool Stream>
void dequantize_f32(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t bs,
                    float* out, int nthreads) {
  const int64_t nblocks = (n + bs - 1) / bs;
  const __m512 base = _mm512_loadu_ps(code);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs;
    const int64_t len = bs < n - start ? bs : n - start;
    const int64_t vlen = len & ~int64_t(15);
    const __m512 tab = _mm512_mul_ps(base, _mm512_set1_ps(absmax[b]));
    for (int64_t i = 0; i < vlen; i += 16) {
      const __m512 v = _mm512_permutexvar_ps(indices16(packed + (start + i) / 2), tab);
      if (Stream)
        _mm512_stream_ps(out + start + i, v);
      else
        _mm512_storeu_ps(out + start + i, v);
    }
    dequantize4_tail<StoreF32>(packed, absmax[b], code, start, vlen, len, out);
  }
  if (Stream) _mm_sfence();
}

}  // namespace

void dequantize4_avx512(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                        void* out, DType ot, int nthreads) {
  if (ot != DType::F32) return dequantize4_avx2(packed, absmax, code, n, blocksize, out, ot, nthreads);
  float* o = static_cast<float*>(out);
  // Non-temporal stores only pay off when the output cannot stay in cache anyway; whole
  // 64-byte lines need a 64-byte aligned output (block starts are multiples of 16 floats).
  if (n * 4 >= (int64_t(32) << 20) && (reinterpret_cast<uintptr_t>(out) & 63) == 0)
    return dequantize_f32<true>(packed, absmax, code, n, blocksize, o, nthreads);
  dequantize_f32<false>(packed, absmax, code, n, blocksize, o, nthreads);
}

}  // namespace qk
