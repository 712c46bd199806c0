// AVX2+FMA path of the fused 4-bit linear layer: the 6x16 micro-kernel of ukernel_avx2.h
// under the shared loop nest of linear4_gemm.h, and for few rows the byte-shuffle GEMV of
// linear4_gemv_shuf.h (blocks of whole 64-element chunks) or the dword-order GEMV of
// linear4_gemv.h (other blocksizes, and the input gradient).
#include "linear4_gemv_shuf.h"
#include "ukernel_avx2.h"

namespace qk {
namespace {

// Rows of x/dy up to which the streaming GEMV beats decode-into-panels + micro-kernel,
// from per-call CPU time on 4096x4096, blocksize 64 (Zen 5; the crossover is where the
// GEMV's repeated passes over x/accumulators cost more than writing a decoded panel).
constexpr int64_t kGemvRowsForward = 8;
constexpr int64_t kGemvRowsBackward = 8;

bool use_gemv(int64_t M, const Weight4& w, bool backward) {
  return M <= (backward ? kGemvRowsBackward : kGemvRowsForward) && gemv_fits<Y8>(w);
}

}  // namespace

void linear4_forward_avx2(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias, float* y,
                          int64_t ldy, int nthreads) {
  if (M == 0 || w.N == 0) return;
  if (use_gemv(M, w, false)) {
    if (shuf_fits(w)) return shuf_forward<4>(x, M, ldx, w, bias, y, ldy, nthreads);
    return gemv_forward<Y8, 4>(x, M, ldx, w, bias, y, ldy, nthreads);
  }
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float* tmp) {
    pack_forward_panel<Kernel6x16::NR>(w, j0, nc, p0, kc, bp, tmp);
  };
  gemm_driver<Kernel6x16>(M, w.N, w.K, x, ldx, y, ldy, bias, pack, nthreads);
}

void linear4_backward_input_avx2(const float* dy, int64_t M, int64_t lddy, const Weight4& w, float* dx,
                                 int64_t lddx, int nthreads) {
  if (M == 0 || w.K == 0) return;
  if (use_gemv(M, w, true)) return gemv_backward<Y8>(dy, M, lddy, w, dx, lddx, nthreads);
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float*) {
    pack_backward_panel<Kernel6x16::NR>(w, j0, nc, p0, kc, bp);
  };
  gemm_driver<Kernel6x16>(M, w.K, w.N, dy, lddy, dx, lddx, nullptr, pack, nthreads);
}

const char* linear4_plan_avx2(int64_t M, const Weight4& w, bool backward) {
  if (!use_gemv(M, w, backward)) return "gemm";
  return !backward && shuf_fits(w) ? "gemv-shuf" : "gemv";
}

}  // namespace qk
