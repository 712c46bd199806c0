// The vector loop of the fused AdamW, written once for any SIMD width. Each ISA file
// (adamw_avx2.cpp, adamw_avx512.cpp) supplies a traits struct V with the register type and
// its intrinsics and instantiates adamw_range_simd<V>; the tail goes through the scalar
// update. The lerp uses one FMA, as torch's vectorized lerp does. Internal linkage, as
// in adamw_common.h.
#pragma once
#include "adamw_common.h"

namespace qk {
namespace {

template <class V>
void adamw_range_simd(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                      const AdamWCoeffs& c) {
  using R = typename V::Reg;
  const bool near_m = std::fabs(c.lerp_w) < 0.5f;
  const R coeff = V::set1(near_m ? c.lerp_w : c.lerp_w - 1.0f);
  const R decay = V::set1(c.decay), beta2 = V::set1(c.beta2), c2 = V::set1(c.c2);
  const R bc2 = V::set1(c.bc2_sqrt), eps = V::set1(c.eps), step = V::set1(c.neg_step);
  int64_t i = begin;
  for (; i + V::kLanes <= end; i += V::kLanes) {
    R gv = V::load(g + i);
    if (c.maximize) gv = V::neg(gv);
    R pv = V::load(p + i);
    if (c.apply_decay) pv = V::mul(pv, decay);
    R mv = V::load(m + i);
    mv = V::fmadd(coeff, V::sub(gv, mv), near_m ? mv : gv);
    R vv = V::load(v + i);
    vv = V::add(V::mul(vv, beta2), V::mul(V::mul(c2, gv), gv));
    V::store(m + i, mv);
    V::store(v + i, vv);
    const R denom = V::add(V::div(V::sqrt(vv), bc2), eps);
    V::store(p + i, V::add(pv, V::div(V::mul(step, mv), denom)));
  }
  for (; i < end; ++i) adamw_element(p[i], g[i], m[i], v[i], c);
}

}  // namespace
}  // namespace qk
