// AVX-512 path of the fused AdamW: 16 lanes (the loop is adamw_simd.h).
#include <immintrin.h>

#include "adamw_simd.h"

namespace qk {
namespace {

struct Avx512 {
  using Reg = __m512;
  static constexpr int kLanes = 16;
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm512_div_ps(a, b); }
  static Reg sqrt(Reg a) { return _mm512_sqrt_ps(a); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg neg(Reg a) { return _mm512_xor_ps(a, _mm512_set1_ps(-0.0f)); }
};

}  // namespace

void adamw_range_avx512(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                        const AdamWCoeffs& c) {
  adamw_range_simd<Avx512>(p, g, m, v, begin, end, c);
}

}  // namespace qk
