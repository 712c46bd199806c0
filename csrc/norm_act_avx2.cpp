// AVX2 path of the fused RMSNorm / SwiGLU: 8 lanes (the loops are norm_act_simd.h).
#include <immintrin.h>

#include "norm_act_simd.h"
#include "vec_avx2.h"

namespace qk {

NormActKernels norm_act_avx2() { return norm_act_table<VecAvx2>(); }

}  // namespace qk
