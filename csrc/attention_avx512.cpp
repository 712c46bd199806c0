// AVX-512 path of the training attention: 16 lanes (attention_simd.h).
#include "attention_simd.h"
#include "vec_avx512.h"

namespace qk {

AttnKernels attention_avx512() { return attention_table<VecAvx512>(); }

}  // namespace qk
