// AVX-512 path of the fused AdamW: 16 lanes, the tail through the scalar update. The lerp
// uses one FMA, as torch's vectorized lerp does.
#include <immintrin.h>

#include "adamw_common.h"

namespace qk {

void adamw_range_avx512(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                      const AdamWCoeffs& c) {
  const bool near_m = std::fabs(c.lerp_w) < 0.5f;
  const __m512 coeff = _mm512_set1_ps(near_m ? c.lerp_w : c.lerp_w - 1.0f);
  const __m512 decay = _mm512_set1_ps(c.decay), beta2 = _mm512_set1_ps(c.beta2), c2 = _mm512_set1_ps(c.c2);
  const __m512 bc2 = _mm512_set1_ps(c.bc2_sqrt), eps = _mm512_set1_ps(c.eps), step = _mm512_set1_ps(c.neg_step);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m512 gv = _mm512_loadu_ps(g + i);
    if (c.maximize) gv = _mm512_xor_ps(gv, sign);
    __m512 pv = _mm512_loadu_ps(p + i);
    if (c.apply_decay) pv = _mm512_mul_ps(pv, decay);
    __m512 mv = _mm512_loadu_ps(m + i);
    mv = _mm512_fmadd_ps(coeff, _mm512_sub_ps(gv, mv), near_m ? mv : gv);
    __m512 vv = _mm512_loadu_ps(v + i);
    vv = _mm512_add_ps(_mm512_mul_ps(vv, beta2), _mm512_mul_ps(_mm512_mul_ps(c2, gv), gv));
    _mm512_storeu_ps(m + i, mv);
    _mm512_storeu_ps(v + i, vv);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), bc2), eps);
    pv = _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(step, mv), denom));
    _mm512_storeu_ps(p + i, pv);
  }
  for (; i < end; ++i) adamw_element(p[i], g[i], m[i], v[i], c);
}

}  // namespace qk
