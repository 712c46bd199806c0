// The AVX-512 path's FMA limit: zmm FMA chains (memory reads are measured with the AVX2
// loop: two loads a cycle of either width exceed what any cache level delivers).
#include <immintrin.h>

#include <cstdint>

#include "peak.h"

namespace qk {

float fma_chains_avx512(int64_t iters, float seed) {
  __m512 acc[kPeakChains];
  for (int c = 0; c < kPeakChains; ++c) acc[c] = _mm512_set1_ps(seed + 0.001f * c);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < kPeakChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  __m512 s = acc[0];
  for (int c = 1; c < kPeakChains; ++c) s = _mm512_add_ps(s, acc[c]);
  return _mm512_reduce_add_ps(s);
}

}  // namespace qk
