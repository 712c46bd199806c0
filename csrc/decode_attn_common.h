// The decode-step attention of decode.h in plain C++, compiled once per ISA file
// (decode_attn_*.cpp) and auto-vectorized there with that file's flags; internal linkage,
// as linear4_common.h explains. The dot products are lora4_common.h's (fixed lanes, fixed
// tree): every ISA path computes the same sums in the same order.
#pragma once
#include <algorithm>
#include <cstdint>

#include "decode.h"
#include "lora4_common.h"

namespace qk {
namespace {

using ExpFn = void (*)(const float* x, int64_t n, float* y);

// One head: scores over [start, n), softmax (max subtracted, normalized as torch's softmax
// then applied), out = sum_t p_t v_t accumulated in t order.
inline void attend_head(const float* q, const float* kc, const float* vc, int64_t hd, int64_t start, int64_t n,
                        float scale, float* out, float* s, ExpFn ex) {
  const int64_t len = n - start;
  float mx = -3.402823466e38f;
  for (int64_t t = 0; t < len; ++t) {
    s[t] = dot<false>(q, nullptr, kc + (start + t) * hd, hd) * scale;
    mx = std::max(mx, s[t]);
  }
  for (int64_t t = 0; t < len; ++t) s[t] -= mx;
  ex(s, len, s);
  float sum = 0.f;
  for (int64_t t = 0; t < len; ++t) sum += s[t];
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < hd; ++d) out[d] = 0.f;
  for (int64_t t = 0; t < len; ++t) {
    const float p = s[t] * inv;
    const float* v = vc + (start + t) * hd;
    for (int64_t d = 0; d < hd; ++d) out[d] += p * v[d];
  }
}

inline void decode_attn_impl(const float* q, const float* k_cache, const float* v_cache, int64_t heads,
                             int64_t kv_heads, int64_t hd, int64_t cap, int64_t start, int64_t n, float scale,
                             float* out, float* scores, int nthreads, ExpFn ex) {
  const int64_t group = heads / kv_heads;
  // Below ~64K multiply-adds a parallel region costs more than it saves.
  const bool par = nthreads > 1 && heads > 1 && heads * (n - start) * hd >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (par)
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = h / group;
    attend_head(q + h * hd, k_cache + g * cap * hd, v_cache + g * cap * hd, hd, start, n, scale, out + h * hd,
                scores + h * n, ex);
  }
}

}  // namespace
}  // namespace qk
