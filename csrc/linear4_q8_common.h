// The activation quantizer of the int8-compute linear (linear4_q8.h), shared by every
// path so that all of them see the same xq and sx. Internal linkage (compiled into
// ISA-flagged files too).
#pragma once
#include <cmath>
#include <cstdint>

#include "linear4_common.h"
#include "linear4_q8.h"

namespace qk {
namespace {

// xq[k] and sx[g] for one row of K elements in groups of G (the last may be short).
inline void quantize_x_groups(const float* x, int64_t K, int64_t G, int8_t* xq, float* sx) {
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += G, ++g) {
    const int64_t len = imin(G, K - g0);
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < len; ++k) {
      const float a = std::fabs(x[g0 + k]);
      finite = finite && std::isfinite(a);
      amax = a > amax ? a : amax;
    }
    if (!finite || amax == 0.f) {
      for (int64_t k = 0; k < len; ++k) xq[g0 + k] = 0;
      sx[g] = finite ? 0.f : NAN;
      continue;
    }
    // Spelled as the reference computes it: one fp32 division, then one fp32 product per
    // element, rounded to nearest even (the default rounding mode).
    const float inv = 127.f / amax;
    for (int64_t k = 0; k < len; ++k) {
      float q = std::nearbyint(x[g0 + k] * inv);
      q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);
      xq[g0 + k] = static_cast<int8_t>(q);
    }
    sx[g] = amax / 16129.f;
  }
}

}  // namespace
}  // namespace qk
