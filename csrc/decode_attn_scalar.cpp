// Baseline-ISA path of the decode-step attention (decode.h), and the per-ISA table; also
// what non-x86 builds run.
#include "decode_attn_common.h"
#include "dispatch.h"
#include "norm_act.h"

namespace qk {

void decode_attn_scalar(const float* q, const float* k_cache, const float* v_cache, int64_t heads, int64_t kv_heads,
                        int64_t head_size, int64_t capacity, int64_t start, int64_t n, float scale, float* out,
                        float* scores, int nthreads) {
  static const ExpFn ex = norm_act_scalar().exp;
  decode_attn_impl(q, k_cache, v_cache, heads, kv_heads, head_size, capacity, start, n, scale, out, scores, nthreads,
                   ex);
}

namespace {
const DecodeAttnFn kScalar = decode_attn_scalar;
#if defined(QK_X86)
const DecodeAttnFn kAvx2 = decode_attn_avx2;
const DecodeAttnFn kAvx512 = decode_attn_avx512;
#endif
}  // namespace

const DecodeAttnFn& decode_attn() {
#if defined(QK_X86)
  return for_current_isa(kScalar, kAvx2, kAvx512);
#else
  return for_current_isa(kScalar, kScalar, kScalar);
#endif
}

}  // namespace qk
