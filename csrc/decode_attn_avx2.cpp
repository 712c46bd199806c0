// The decode-step attention (decode.h) auto-vectorized with this file's ISA flags (setup.py).
#include "decode_attn_common.h"
#include "norm_act.h"

namespace qk {

void decode_attn_avx2(const float* q, const float* k_cache, const float* v_cache, int64_t heads, int64_t kv_heads,
                      int64_t head_size, int64_t capacity, int64_t start, int64_t n, float scale, float* out,
                      float* scores, int nthreads) {
  static const ExpFn ex = norm_act_avx2().exp;
  decode_attn_impl(q, k_cache, v_cache, heads, kv_heads, head_size, capacity, start, n, scale, out, scores, nthreads,
                   ex);
}

}  // namespace qk
