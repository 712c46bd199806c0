// The 16-lane fp32 operations the vector kernel families (adamw_simd.h, norm_act_simd.h,
// attention_simd.h) are written against, for AVX-512-flagged translation units; each
// family's ISA file derives its traits struct from this and adds what only it needs.
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
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg min(Reg a, Reg b) { return _mm512_min_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  // a fixed tree (not _mm512_reduce_add_ps, whose order is the compiler's): deterministic
  static float hsum(Reg a) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // p * 2^n for integral n in [-150, 129] (NaN n: p is NaN too); the exp of norm_act_simd.h
  static Reg scale_pow2(Reg p, Reg n) {
    const __m512i ni = _mm512_cvtps_epi32(n);
    const __m512i e1 = _mm512_srai_epi32(ni, 1);
    const __m512i e2 = _mm512_sub_epi32(ni, e1);
    const __m512i bias = _mm512_set1_epi32(127);
    const Reg f1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e1, bias), 23));
    const Reg f2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e2, bias), 23));
    return _mm512_mul_ps(_mm512_mul_ps(p, f1), f2);
  }
};

}  // namespace
}  // namespace qk
