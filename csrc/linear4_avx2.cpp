// AVX2+FMA path of the fused 4-bit linear layer: the 6x16 micro-kernel of ukernel_avx2.h
// under the shared loop nest of linear4_gemm.h, and for few rows the byte-shuffle GEMV of
// linear4_gemv_shuf.h (blocks of whole 64-element chunks) or the dword-order GEMV of
// linear4_gemv.h (other blocksizes, and the input gradient).
#include "linear4_gemv_shuf.h"
#include "ukernel_avx2.h"

namespace qk {
namespace {

// Rows up to which the streaming GEMV beats decode-into-panels + micro-kernel, and the
// GEMV's decoder: tuning.h.
bool use_gemv(int64_t M, const Weight4& w, bool backward, const Tuning& t) {
  return M <= (backward ? t.gemv_rows_backward : t.gemv_rows_forward) && gemv_fits<Y8>(w);
}

bool use_shuf(const Weight4& w, const Tuning& t) { return t.gemv_decode == 0 && shuf_fits(w); }

// Decoding a KC x NC panel of the 4-bit weight costs about as much as this many rows of
// micro-kernel work on it (the thread-grid choice of linear4_gemm.h weighs it).
constexpr int64_t kPackRows = 24;

}  // namespace

void linear4_forward_avx2(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias, float* y,
                          int64_t ldy, int nthreads) {
  if (M == 0 || w.N == 0) return;
  const Tuning t = tuning(Isa::Avx2);
  if (use_gemv(M, w, false, t)) {
    if (use_shuf(w, t)) return shuf_forward<4>(x, M, ldx, w, bias, y, ldy, nthreads);
    return gemv_forward<Y8, 4>(x, M, ldx, w, bias, y, ldy, nthreads);
  }
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float* tmp) {
    pack_forward_panel<Kernel6x16::NR>(w, j0, nc, p0, kc, bp, tmp);
  };
  gemm_driver<Kernel6x16>(M, w.N, w.K, x, ldx, y, ldy, bias, pack, blocking(t), Kernel6x16::NR, kPackRows, nthreads);
}

void linear4_backward_input_avx2(const float* dy, int64_t M, int64_t lddy, const Weight4& w, float* dx,
                                 int64_t lddx, int nthreads) {
  if (M == 0 || w.K == 0) return;
  const Tuning t = tuning(Isa::Avx2);
  if (use_gemv(M, w, true, t)) return gemv_backward<Y8>(dy, M, lddy, w, dx, lddx, nthreads);
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float*) {
    pack_backward_panel<Kernel6x16::NR>(w, j0, nc, p0, kc, bp);
  };
  gemm_driver<Kernel6x16>(M, w.K, w.N, dy, lddy, dx, lddx, nullptr, pack, blocking(t), 32, kPackRows,
                           nthreads);
}

const char* linear4_plan_avx2(int64_t M, const Weight4& w, bool backward) {
  const Tuning t = tuning(Isa::Avx2);
  if (!use_gemv(M, w, backward, t)) return "gemm";
  return !backward && use_shuf(w, t) ? "gemv-shuf" : "gemv";
}

}  // namespace qk
