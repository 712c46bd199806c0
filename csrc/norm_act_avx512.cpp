// AVX-512 path of the fused RMSNorm / SwiGLU: 16 lanes (the loops are norm_act_simd.h).
#include <immintrin.h>

#include "norm_act_simd.h"
#include "vec_avx512.h"

namespace qk {

NormActKernels norm_act_avx512() { return norm_act_table<VecAvx512>(); }

}  // namespace qk
