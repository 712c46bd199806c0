// Run-time tuning of the CPU kernels, per ISA path: the cache blocking of the many-row
// loop nest (linear4_gemm.h) and the few-row choices of the fused 4-bit linear. The
// built-in defaults were measured on one machine per ISA; the best values depend on the
// cache sizes and the decode throughput of the machine at hand (an AVX2 loop tuned on a
// Zen 5 core is not tuned for a Zen 2 one), so qlora_kernels.tuning measures candidates
// on first use and sets them here. Every value changes only how the same products are
// blocked or which kernel computes them: results stay within the fp32 bound of linear4.h.
#pragma once
#include <cstdint>
#include <string>

#include "dispatch.h"

namespace qk {

struct Tuning {
  int64_t kc;                  // reduction depth of a B panel: a multiple of 64 in [64, 1024]
  int64_t nc;                  // output columns of a B panel: a multiple of 64 in [64, 4096]
  int64_t mc;                  // rows of A per packed block, in [1, 2048] (the loop rounds it up to MR)
  int64_t gemv_rows_forward;   // the forward takes the streaming GEMV up to this many rows, in [0, 16]
  int64_t gemv_rows_backward;  // the input gradient likewise, in [0, 16]
  int64_t gemv_decode;         // AVX2 forward GEMV: 0 = byte-shuffle decode where it fits, 1 = dword permute
};

Tuning default_tuning(Isa isa);
Tuning tuning(Isa isa);                     // the values in use (Avx512Vnni shares Avx512's)
void set_tuning(Isa isa, const Tuning& t);  // throws std::invalid_argument naming the field

// The cache blocking the loop nest reads.
struct Blocking {
  int64_t kc, nc, mc;
};
inline Blocking blocking(const Tuning& t) { return {t.kc, t.nc, t.mc}; }

}  // namespace qk
