// Baseline-ISA path of the LoRA tail (lora4.h), and the per-ISA table; also what non-x86 builds run.
#include "lora4_common.h"
#include "dispatch.h"

namespace qk {

void lora4_tail_scalar(const float* x, int64_t M, int64_t K, int64_t ldx, const float* noise, int64_t ldn,
                           const LoraTail& t, float* y, int64_t N, int64_t ldy, float* u) {
  lora4_tail_impl(x, M, K, ldx, noise, ldn, t, y, N, ldy, u);
}

namespace {
const Lora4TailFn kScalar = lora4_tail_scalar;
#if defined(QK_X86)
const Lora4TailFn kAvx2 = lora4_tail_avx2;
const Lora4TailFn kAvx512 = lora4_tail_avx512;
#endif
}  // namespace

const Lora4TailFn& lora4_tail() {
#if defined(QK_X86)
  return for_current_isa(kScalar, kAvx2, kAvx512);
#else
  return for_current_isa(kScalar, kScalar, kScalar);
#endif
}

}  // namespace qk
