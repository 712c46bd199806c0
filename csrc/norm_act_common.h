// Scalar pieces of the fused RMSNorm / SwiGLU, shared by every ISA path for its tail so
// the last elements of a row are computed as on the scalar path. Internal linkage: this
// header is compiled into ISA-flagged files too (see linear4_common.h).
//
// exp: no libm call. The wheel's floor (glibc 2.17) has no libmvec to vectorize expf, and
// -ffast-math would break the NaN compares elsewhere; one algorithm written out here and
// in norm_act_simd.h, with the same operations in the same order, gives every path the
// same bits. x = n*ln2 + r with n = round(x / ln2) (|r| <= ln2/2, ln2 split in two so that
// n*ln2_hi is exact); exp(r) by its Taylor polynomial to degree 7 (truncation < 6e-9
// relative), summed as 1 + (r + r^2 q(r)) so that the small terms round before the 1
// (Horner down to the constant measured 1.17 ulp); then 2^n as two exponent-field scalings
// 2^(n>>1) * 2^(n - (n>>1)), each normal for every n of the clamped range, so overflow to
// inf and gradual underflow come out of the last multiply alone. x is clamped to
// [-104, 89] (exp is 0 / inf beyond) and NaN returns NaN. Measured against fp64 exp over
// every 61st fp32 bit pattern in [-104, 89] and 2M points of [-1, 1]: at most 1.01 ulp of
// the result for normal results (tests/test_fused_layers.py::test_exp_ulps holds 1.01).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace qk {
namespace {

namespace expc {
constexpr float kLo = -104.0f, kHi = 89.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;           // 355/512: 9 bits, so n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln2 - kLn2Hi
constexpr float kRound = 12582912.0f;             // 1.5 * 2^23: (t + kRound) - kRound rounds t to an integer
constexpr float kC[8] = {1.0f, 1.0f, 1.0f / 2, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};
}  // namespace expc

inline float pow2_scalar(int32_t e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float exp_scalar(float x) {
  using namespace expc;
  if (x != x) return x;
  x = x < kLo ? kLo : (x > kHi ? kHi : x);
  const float n = (x * kLog2e + kRound) - kRound;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float q = kC[7];
  for (int k = 6; k >= 2; --k) q = q * r + kC[k];
  const float p = (r * r * q + r) + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t e1 = ni >> 1;
  return p * pow2_scalar(e1) * pow2_scalar(ni - e1);
}

inline void swiglu_forward_elem(float g, float u, float& h) {
  const float silu = g / (1.0f + exp_scalar(-g));
  h = silu * u;
}

inline void swiglu_backward_elem(float dh, float g, float u, float& dg, float& du) {
  const float d1 = 1.0f + exp_scalar(-g);
  const float s = 1.0f / d1;
  du = dh * (g / d1);
  dg = (dh * u) * s * (1.0f + g * (1.0f - s));
}

}  // namespace
}  // namespace qk
