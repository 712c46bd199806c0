// qlora-kernels: fused AdamW step (decoupled weight decay), torch-free.
//
// One element update, in torch's order of operations (torch.optim.AdamW, fused CPU kernel):
//   p  = p * (1 - lr*wd)                                   (skipped when wd == 0)
//   m  = lerp(m, g, 1 - beta1)
//   v  = v * beta2 + ((1 - beta2) * g) * g
//   p  = p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// with bc1 = 1 - beta1^step, bc2 = 1 - beta2^step computed in double per tensor, then every
// coefficient rounded once to fp32 (as torch converts its Python-float scalars). g is
// negated first under maximize. Each element is read once (p, g, m, v) and written once
// (p, m, v): the step is bound by memory bandwidth, so one pass is the whole game.
#pragma once
#include <cstdint>

namespace qk {

// The fp32 coefficients of one tensor's step.
struct AdamWCoeffs {
  float decay;        // 1 - lr*wd
  bool apply_decay;   // wd != 0
  float lerp_w;       // 1 - beta1
  float beta2;
  float c2;           // 1 - beta2
  float bc2_sqrt;     // sqrt(1 - beta2^step)
  float eps;
  float neg_step;     // -lr / (1 - beta1^step)
  bool maximize;
};

// Updates elements [begin, end) of one tensor.
using AdamWRangeFn = void (*)(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                              const AdamWCoeffs& c);

void adamw_range_scalar(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                        const AdamWCoeffs& c);
#if defined(QK_X86)
void adamw_range_avx2(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                      const AdamWCoeffs& c);
void adamw_range_avx512(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                        const AdamWCoeffs& c);
#endif

AdamWRangeFn adamw_kernel();  // the current ISA path (dispatch.h)

}  // namespace qk
