// qlora-kernels: the LoRA branch of a 4-bit linear layer for few rows, torch-free.
//
//   u[m, j]  = sum_k xd[m, k] * A[j, k]          xd = x (or x * noise: the scaled dropout mask)
//   y[m, n] += scaling * sum_j u[m, j] * B[n, j]
//
// A is [r, K], B is [N, r], both row-major fp32; y already holds the base layer's output
// (linear4.h), so one native call does the whole QLoRA forward of a decode step. These
// rank-r products are a few thousand multiply-adds: as torch matmuls each one cost an
// operator dispatch and an OpenMP fork/join, several times the arithmetic. Here they run
// on the calling thread, with no scratch. fp32 accumulation in a fixed order (lane-wise
// partial sums, then a fixed tree): the error bound of linear4.h with K (resp. r) as the
// reduction length.
#pragma once
#include <cstdint>

namespace qk {

struct LoraTail {
  const float* A;  // [r, K]
  const float* B;  // [N, r]
  int64_t r;
  float scaling;
};

// x [M, K] (row stride ldx), noise [M, K] (row stride ldn) or null, y [M, N] (row stride
// ldy) updated in place, u [M, r] (row stride r) written. Single-threaded.
using Lora4TailFn = void (*)(const float* x, int64_t M, int64_t K, int64_t ldx, const float* noise, int64_t ldn,
                             const LoraTail& t, float* y, int64_t N, int64_t ldy, float* u);

const Lora4TailFn& lora4_tail();  // the current ISA path (dispatch.h)

void lora4_tail_scalar(const float* x, int64_t M, int64_t K, int64_t ldx, const float* noise, int64_t ldn,
                       const LoraTail& t, float* y, int64_t N, int64_t ldy, float* u);
#if defined(QK_X86)
void lora4_tail_avx2(const float* x, int64_t M, int64_t K, int64_t ldx, const float* noise, int64_t ldn,
                     const LoraTail& t, float* y, int64_t N, int64_t ldy, float* u);
void lora4_tail_avx512(const float* x, int64_t M, int64_t K, int64_t ldx, const float* noise, int64_t ldn,
                       const LoraTail& t, float* y, int64_t N, int64_t ldy, float* u);
#endif

}  // namespace qk
