// AVX2+FMA path of the fused AdamW: 8 lanes, the tail through the scalar update. The lerp
// uses one FMA, as torch's vectorized lerp does.
#include <immintrin.h>

#include "adamw_common.h"

namespace qk {

void adamw_range_avx2(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                      const AdamWCoeffs& c) {
  const bool near_m = std::fabs(c.lerp_w) < 0.5f;
  const __m256 coeff = _mm256_set1_ps(near_m ? c.lerp_w : c.lerp_w - 1.0f);
  const __m256 decay = _mm256_set1_ps(c.decay), beta2 = _mm256_set1_ps(c.beta2), c2 = _mm256_set1_ps(c.c2);
  const __m256 bc2 = _mm256_set1_ps(c.bc2_sqrt), eps = _mm256_set1_ps(c.eps), step = _mm256_set1_ps(c.neg_step);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 gv = _mm256_loadu_ps(g + i);
    if (c.maximize) gv = _mm256_xor_ps(gv, sign);
    __m256 pv = _mm256_loadu_ps(p + i);
    if (c.apply_decay) pv = _mm256_mul_ps(pv, decay);
    __m256 mv = _mm256_loadu_ps(m + i);
    mv = _mm256_fmadd_ps(coeff, _mm256_sub_ps(gv, mv), near_m ? mv : gv);
    __m256 vv = _mm256_loadu_ps(v + i);
    vv = _mm256_add_ps(_mm256_mul_ps(vv, beta2), _mm256_mul_ps(_mm256_mul_ps(c2, gv), gv));
    _mm256_storeu_ps(m + i, mv);
    _mm256_storeu_ps(v + i, vv);
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vv), bc2), eps);
    pv = _mm256_add_ps(pv, _mm256_div_ps(_mm256_mul_ps(step, mv), denom));
    _mm256_storeu_ps(p + i, pv);
  }
  for (; i < end; ++i) adamw_element(p[i], g[i], m[i], v[i], c);
}

}  // namespace qk
