// The 16-lane fp32 operations the elementwise kernel families (adamw_simd.h,
// norm_act_simd.h) are written against, for AVX-512-flagged translation units; each family's
// ISA file derives its traits struct from this and adds what only it needs.
#pragma once
#include <immintrin.h>

namespace qk {
namespace {

struct VecAvx512 {
  using Reg = __m512;
  static constexpr int kLanes = 16;
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm512_div_ps(a, b); }
};

}  // namespace
}  // namespace qk
