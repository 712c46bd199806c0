// AVX-512 path of the fused RMSNorm / SwiGLU: 16 lanes (the loops are norm_act_simd.h).
#include <immintrin.h>

#include "norm_act_simd.h"
#include "vec_avx512.h"

namespace qk {
namespace {

struct Avx512 : VecAvx512 {
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

NormActKernels norm_act_avx512() { return norm_act_table<Avx512>(); }

}  // namespace qk
