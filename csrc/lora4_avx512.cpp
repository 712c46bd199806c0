// The LoRA tail (lora4.h) auto-vectorized with this file's ISA flags (setup.py).
#include "lora4_common.h"

namespace qk {

void lora4_tail_avx512(const float* x, int64_t M, int64_t K, int64_t ldx, const float* noise, int64_t ldn,
                           const LoraTail& t, float* y, int64_t N, int64_t ldy, float* u) {
  lora4_tail_impl(x, M, K, ldx, noise, ldn, t, y, N, ldy, u);
}

}  // namespace qk
