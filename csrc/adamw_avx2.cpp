// AVX2+FMA path of the fused AdamW: 8 lanes (the loop is adamw_simd.h).
#include <immintrin.h>

#include "adamw_simd.h"
#include "vec_avx2.h"

namespace qk {
namespace {

struct Avx2 : VecAvx2 {
  static Reg sqrt(Reg a) { return _mm256_sqrt_ps(a); }
  static Reg neg(Reg a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
};

}  // namespace

void adamw_range_avx2(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                      const AdamWCoeffs& c) {
  adamw_range_simd<Avx2>(p, g, m, v, begin, end, c);
}

}  // namespace qk
