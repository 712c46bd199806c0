// Scalar path of the training attention: one lane, the same loops as the SIMD paths (attention_simd.h).
#include "attention_simd.h"
#include "vec_scalar.h"

namespace qk {

AttnKernels attention_scalar() { return attention_table<VecScalar>(); }

}  // namespace qk
