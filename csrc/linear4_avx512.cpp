// AVX-512 (F+BW+VL+DQ) path of the fused 4-bit linear layer: the 12x32 micro-kernel of
// ukernel_avx512.h under the shared loop nest of linear4_gemm.h, and the GEMV paths of
// linear4_gemv.h with 128-element chunks, where one vpermps is a whole 16-entry codebook
// lookup. Only chosen when cpuid reports all four extensions.
#include "linear4_gemv.h"
#include "ukernel_avx512.h"

namespace qk {
namespace {

// The GEMV/GEMM crossovers: tuning.h. Row groups of the 512-bit GEMV: at most this many
// rows share one pass over the weight.
constexpr int kGemvGroup = 6;

// Z16 needs 128-element rows; rows of 64*odd elements still get the 256-bit GEMV.
const char* gemv_kind(int64_t M, const Weight4& w, bool backward) {
  const Tuning t = tuning(Isa::Avx512);
  if (M > (backward ? t.gemv_rows_backward : t.gemv_rows_forward)) return nullptr;
  if (gemv_fits<Z16>(w)) return "gemv";
  if (gemv_fits<Y8>(w)) return "gemv-256";
  return nullptr;
}

// Decoding a KC x NC panel of the 4-bit weight costs about as much as this many rows of
// micro-kernel work on it (the thread-grid choice of linear4_gemm.h weighs it).
constexpr int64_t kPackRows = 24;

}  // namespace

void linear4_forward_avx512(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias, float* y,
                            int64_t ldy, int nthreads) {
  if (M == 0 || w.N == 0) return;
  if (const char* g = gemv_kind(M, w, false)) {
    if (g[4] == '\0') return gemv_forward<Z16, kGemvGroup>(x, M, ldx, w, bias, y, ldy, nthreads);
    return gemv_forward<Y8, 4>(x, M, ldx, w, bias, y, ldy, nthreads);
  }
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float* tmp) {
    pack_forward_panel<Kernel12x32::NR>(w, j0, nc, p0, kc, bp, tmp);
  };
  gemm_driver<Kernel12x32>(M, w.N, w.K, x, ldx, y, ldy, bias, pack, blocking(tuning(Isa::Avx512)), Kernel12x32::NR, kPackRows, nthreads);
}

void linear4_backward_input_avx512(const float* dy, int64_t M, int64_t lddy, const Weight4& w, float* dx,
                                   int64_t lddx, int nthreads) {
  if (M == 0 || w.K == 0) return;
  if (const char* g = gemv_kind(M, w, true)) {
    if (g[4] == '\0') return gemv_backward<Z16>(dy, M, lddy, w, dx, lddx, nthreads);
    return gemv_backward<Y8>(dy, M, lddy, w, dx, lddx, nthreads);
  }
  const auto pack = [&w](int64_t j0, int64_t nc, int64_t p0, int64_t kc, float* bp, float*) {
    pack_backward_panel<Kernel12x32::NR>(w, j0, nc, p0, kc, bp);
  };
  gemm_driver<Kernel12x32>(M, w.K, w.N, dy, lddy, dx, lddx, nullptr, pack, blocking(tuning(Isa::Avx512)), 32, kPackRows,
                           nthreads);
}

const char* linear4_plan_avx512(int64_t M, const Weight4& w, bool backward) {
  const char* g = gemv_kind(M, w, backward);
  return g ? g : "gemm";
}

}  // namespace qk
