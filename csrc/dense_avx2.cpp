// AVX2+FMA path of the dense fp32 linear (dense.h): the micro-kernel of ukernel_avx2.h under
// the loop nest of linear4_gemm.h, B panels copied from W (dense_pack.h).
#include "dense_pack.h"
#include "ukernel_avx2.h"

namespace qk {

void dense_forward_avx2(const float* x, int64_t M, int64_t ldx, const DenseWeight& w, const float* bias, float* y,
                        int64_t ldy, int nthreads) {
  dense_forward_with<Kernel6x16>(x, M, ldx, w, bias, y, ldy, blocking(tuning(Isa::Avx2)), nthreads);
}

void dense_backward_input_avx2(const float* dy, int64_t M, int64_t lddy, const DenseWeight& w, float* dx,
                               int64_t lddx, int nthreads) {
  dense_backward_input_with<Kernel6x16>(dy, M, lddy, w, dx, lddx, blocking(tuning(Isa::Avx2)), nthreads);
}

}  // namespace qk
