// Scalar element update of the fused AdamW, shared by every ISA path for its tail so a
// tensor's last elements are computed exactly as on the scalar path. Internal linkage:
// this header is compiled into ISA-flagged files too (see linear4_common.h).
#pragma once
#include <cmath>

#include "adamw.h"

namespace qk {
namespace {

inline void adamw_element(float& p, float g, float& m, float& v, const AdamWCoeffs& c) {
  if (c.maximize) g = -g;
  if (c.apply_decay) p = p * c.decay;
  // torch's lerp: the form that stays exact at the end nearer to the weight.
  if (std::fabs(c.lerp_w) < 0.5f)
    m = m + c.lerp_w * (g - m);
  else
    m = g - (g - m) * (1.0f - c.lerp_w);
  v = v * c.beta2 + c.c2 * g * g;
  const float denom = std::sqrt(v) / c.bc2_sqrt + c.eps;
  p = p + c.neg_step * m / denom;
}

}  // namespace
}  // namespace qk
