// The scalar path's limits: the baseline x86-64 build may use SSE2, so its peak is four
// lanes of separate multiply and add (no FMA below AVX2).
#include <cstdint>

#include "peak.h"

#if defined(QK_X86)
#include <emmintrin.h>
#endif

namespace qk {

float fma_chains_scalar(int64_t iters, float seed) {
#if defined(QK_X86)
  __m128 acc[kPeakChains];
  for (int c = 0; c < kPeakChains; ++c) acc[c] = _mm_set1_ps(seed + 0.001f * c);
  const __m128 a = _mm_set1_ps(0.999999f), b = _mm_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < kPeakChains; ++c) acc[c] = _mm_add_ps(_mm_mul_ps(acc[c], a), b);
  __m128 s = acc[0];
  for (int c = 1; c < kPeakChains; ++c) s = _mm_add_ps(s, acc[c]);
  float out[4];
  _mm_storeu_ps(out, s);
  return out[0] + out[1] + out[2] + out[3];
#else
  float acc[kPeakChains][4];
  for (int c = 0; c < kPeakChains; ++c)
    for (int l = 0; l < 4; ++l) acc[c][l] = seed + 0.001f * c;
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < kPeakChains; ++c)
      for (int l = 0; l < 4; ++l) acc[c][l] = acc[c][l] * 0.999999f + 1e-7f;
  float s = 0;
  for (int c = 0; c < kPeakChains; ++c)
    for (int l = 0; l < 4; ++l) s += acc[c][l];
  return s;
#endif
}

float read_sum_scalar(const float* p, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += p[i + l];
  float s = 0;
  for (float a : acc) s += a;
  return s;
}

}  // namespace qk
