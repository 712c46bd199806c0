// AVX-512 path of the dense fp32 linear (dense.h): the micro-kernel of ukernel_avx512.h under
// the loop nest of linear4_gemm.h, B panels copied from W (dense_pack.h).
#include "dense_pack.h"
#include "ukernel_avx512.h"

namespace qk {

void dense_forward_avx512(const float* x, int64_t M, int64_t ldx, const DenseWeight& w, const float* bias, float* y,
                        int64_t ldy, int nthreads) {
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float*) {
    pack_dense_forward<Kernel12x32::NR>(w, j0, nc, p0, kc, bp);
  };
  gemm_driver<Kernel12x32>(M, w.N, w.K, x, ldx, y, ldy, bias, pack, nthreads);
}

void dense_backward_input_avx512(const float* dy, int64_t M, int64_t lddy, const DenseWeight& w, float* dx,
                               int64_t lddx, int nthreads) {
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float*) {
    pack_dense_backward<Kernel12x32::NR>(w, j0, nc, p0, kc, bp);
  };
  gemm_driver<Kernel12x32>(M, w.K, w.N, dy, lddy, dx, lddx, nullptr, pack, nthreads);
}

}  // namespace qk
