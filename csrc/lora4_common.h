// The LoRA tail of lora4.h in plain C++, compiled once per ISA file (lora4_*.cpp) and
// auto-vectorized there with that file's flags. Internal linkage (anonymous namespace), as
// linear4_common.h explains: no ISA-flagged copy may leak into another path.
//
// Each dot product keeps kLanes independent partial sums (lane l takes the terms whose
// index is l mod kLanes) and adds them in a fixed tree at the end: the compiler may then
// keep the lanes in vector registers without reassociating anything (-ffp-contract=off,
// no -ffast-math), and every ISA path computes the same sums in the same order.
#pragma once
#include <cstdint>

#include "lora4.h"

namespace qk {
namespace {

constexpr int kLanes = 16;
static_assert((kLanes & (kLanes - 1)) == 0, "the final tree halves the lanes");

inline float tree_sum(float* acc) {
#pragma GCC unroll 4
  for (int w = kLanes / 2; w >= 1; w /= 2) {
#pragma GCC unroll 8
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

// sum_i a[i] * b[i] (NOISE: sum_i (a[i] * c[i]) * b[i], the product rounded first, as
// torch's x * noise is), i < n.
template <bool NOISE>
inline float dot(const float* a, const float* c, const float* b, int64_t n) {
  float acc[kLanes];
#pragma GCC unroll 16
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.f;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 16
    for (int l = 0; l < kLanes; ++l) acc[l] += (NOISE ? a[i + l] * c[i + l] : a[i + l]) * b[i + l];
  }
  for (int l = 0; i + l < n; ++l) acc[l] += (NOISE ? a[i + l] * c[i + l] : a[i + l]) * b[i + l];
  return tree_sum(acc);
}

template <bool NOISE>
void lora4_tail_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const float* noise, int64_t ldn,
                     const LoraTail& t, float* y, int64_t N, int64_t ldy, float* u) {
  const int64_t r = t.r;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    const float* nm = NOISE ? noise + m * ldn : nullptr;
    float* um = u + m * r;
    // A's rows stream once per row of x; x's row stays in L1 across them.
    for (int64_t j = 0; j < r; ++j) um[j] = dot<NOISE>(xm, nm, t.A + j * K, K);
    float* ym = y + m * ldy;
    // y += s * (u B^T): B's rows are contiguous, one short dot product per output.
    for (int64_t n = 0; n < N; ++n) ym[n] += t.scaling * dot<false>(um, nullptr, t.B + n * r, r);
  }
}

inline void lora4_tail_impl(const float* x, int64_t M, int64_t K, int64_t ldx, const float* noise, int64_t ldn,
                            const LoraTail& t, float* y, int64_t N, int64_t ldy, float* u) {
  if (noise)
    lora4_tail_rows<true>(x, M, K, ldx, noise, ldn, t, y, N, ldy, u);
  else
    lora4_tail_rows<false>(x, M, K, ldx, noise, ldn, t, y, N, ldy, u);
}

}  // namespace
}  // namespace qk
