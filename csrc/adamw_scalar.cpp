// Scalar path of the fused AdamW: the reference every SIMD path is tested against (and
// what non-x86 builds run).
#include "adamw_common.h"

namespace qk {

void adamw_range_scalar(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                        const AdamWCoeffs& c) {
  for (int64_t i = begin; i < end; ++i) adamw_element(p[i], g[i], m[i], v[i], c);
}

}  // namespace qk
