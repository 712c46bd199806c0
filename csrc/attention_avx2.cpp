// AVX2 path of the training attention: 8 lanes (attention_simd.h).
#include "attention_simd.h"
#include "vec_avx2.h"

namespace qk {

AttnKernels attention_avx2() { return attention_table<VecAvx2>(); }

}  // namespace qk
