// AVX-512 path of the dense fp32 linear (dense.h): the micro-kernel of ukernel_avx512.h under
// the loop nest of linear4_gemm.h, B panels copied from W (dense_pack.h).
#include "dense_pack.h"
#include "ukernel_avx512.h"

namespace qk {

void dense_forward_avx512(const float* x, int64_t M, int64_t ldx, const DenseWeight& w, const float* bias, float* y,
                          int64_t ldy, int nthreads) {
  dense_forward_with<Kernel12x32>(x, M, ldx, w, bias, y, ldy, blocking(tuning(Isa::Avx512)), nthreads);
}

void dense_backward_input_avx512(const float* dy, int64_t M, int64_t lddy, const DenseWeight& w, float* dx,
                                 int64_t lddx, int nthreads) {
  dense_backward_input_with<Kernel12x32>(dy, M, lddy, w, dx, lddx, blocking(tuning(Isa::Avx512)), nthreads);
}

}  // namespace qk
