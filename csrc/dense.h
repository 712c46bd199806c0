// qlora-kernels: dense fp32 linear layer, torch-free: y = x W^T (+ bias) and dx = dy W for a
// row-major fp32 W [N, K] (row stride ld). It exists for the frozen dense layers around the
// 4-bit ones, above all the output head of the fused linear + cross-entropy loss, and
// reuses the 4-bit path's loop nest and micro-kernels (linear4_gemm.h, ukernel_*.h) with B
// panels copied from W instead of decoded: on CPUs where the BLAS torch links against does
// not use AVX-512 this runs at up to twice its speed. fp32 accumulation; the same error
// bound as linear4.h with Wd = W.
#pragma once
#include <cstdint>

namespace qk {

struct DenseWeight {
  const float* w;  // [N, K], row stride ld >= K
  int64_t N, K, ld;
};

using DenseForwardFn = void (*)(const float* x, int64_t M, int64_t ldx, const DenseWeight& w, const float* bias,
                                float* y, int64_t ldy, int nthreads);
using DenseBackwardFn = void (*)(const float* dy, int64_t M, int64_t lddy, const DenseWeight& w, float* dx,
                                 int64_t lddx, int nthreads);

struct DenseKernels {
  DenseForwardFn forward;
  DenseBackwardFn backward_input;
};
const DenseKernels& dense_kernels();  // the current ISA path (dispatch.h)

void dense_forward_scalar(const float* x, int64_t M, int64_t ldx, const DenseWeight& w, const float* bias, float* y,
                          int64_t ldy, int nthreads);
void dense_backward_input_scalar(const float* dy, int64_t M, int64_t lddy, const DenseWeight& w, float* dx,
                                 int64_t lddx, int nthreads);
#if defined(QK_X86)
void dense_forward_avx2(const float* x, int64_t M, int64_t ldx, const DenseWeight& w, const float* bias, float* y,
                        int64_t ldy, int nthreads);
void dense_backward_input_avx2(const float* dy, int64_t M, int64_t lddy, const DenseWeight& w, float* dx,
                               int64_t lddx, int nthreads);
void dense_forward_avx512(const float* x, int64_t M, int64_t ldx, const DenseWeight& w, const float* bias, float* y,
                          int64_t ldy, int nthreads);
void dense_backward_input_avx512(const float* dy, int64_t M, int64_t lddy, const DenseWeight& w, float* dx,
                                 int64_t lddx, int nthreads);
#endif

}  // namespace qk
