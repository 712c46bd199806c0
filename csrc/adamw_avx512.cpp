// AVX-512 path of the fused AdamW: 16 lanes (the loop is adamw_simd.h).
#include <immintrin.h>

#include "adamw_simd.h"
#include "vec_avx512.h"

namespace qk {
namespace {

struct Avx512 : VecAvx512 {
  static Reg sqrt(Reg a) { return _mm512_sqrt_ps(a); }
  static Reg neg(Reg a) { return _mm512_xor_ps(a, _mm512_set1_ps(-0.0f)); }
};

}  // namespace

void adamw_range_avx512(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                        const AdamWCoeffs& c) {
  adamw_range_simd<Avx512>(p, g, m, v, begin, end, c);
}

}  // namespace qk
