// The 8-lane fp32 operations the elementwise kernel families (adamw_simd.h,
// norm_act_simd.h) are written against, for AVX2-flagged translation units; each family's
// ISA file derives its traits struct from this and adds what only it needs.
#pragma once
#include <immintrin.h>

namespace qk {
namespace {

struct VecAvx2 {
  using Reg = __m256;
  static constexpr int kLanes = 8;
  static Reg set1(float x) { return _mm256_set1_ps(x); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Reg x) { _mm256_storeu_ps(p, x); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm256_div_ps(a, b); }
};

}  // namespace
}  // namespace qk
