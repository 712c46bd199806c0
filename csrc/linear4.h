// qlora-kernels: fused 4-bit linear layer, torch-free.
//
// The weight W is [N, K] (out_features x in_features) in the packed layout of quant4.h,
// taken over the flattened row-major array: element (n, k) has flat index i = n*K + k,
// lives in byte i / 2 (EVEN i in the HIGH nibble) and is worth
//     Wd[n, k] = code[nibble(i)] * absmax[i / blocksize]      (one fp32 multiply)
// K need not be a multiple of the blocksize nor of 2: a block may straddle two rows and
// a row may start in a low nibble. code is passed in (never spelled out in C++).
//
// Every kernel below computes with exactly those fp32 values Wd (the product is rounded
// once, as dequantize_4bit rounds it) and accumulates in fp32, so it differs from
// `x @ Wd.T` evaluated in fp64 only by the rounding of its sums: |err| <= (K+2) * 2^-24 *
// (|x| @ |Wd|.T) elementwise (K = the reduction length), in practice ~sqrt(K) * 2^-24.
// None of them materializes Wd: panels of it are decoded into per-thread scratch sized by
// the cache blocking (see linear4_peak_scratch_bytes()).
#pragma once
#include <cstddef>
#include <cstdint>

namespace qk {

struct Weight4 {
  const uint8_t* packed;  // (N*K + 1) / 2 bytes
  const float* absmax;    // ceil(N*K / blocksize) entries
  const float* code;      // 16 entries, index = nibble
  int64_t N, K, blocksize;
};

// y[m, n] = sum_k x[m, k] * Wd[n, k] (+ bias[n]); x is [M, K] with row stride ldx, y is
// [M, N] with row stride ldy; bias may be null. y must not overlap x.
using Linear4ForwardFn = void (*)(const float* x, int64_t M, int64_t ldx, const Weight4& w,
                                  const float* bias, float* y, int64_t ldy, int nthreads);
// dx[m, k] = sum_n dy[m, n] * Wd[n, k]; dy is [M, N] (row stride lddy), dx is [M, K]
// (row stride lddx).
using Linear4BackwardFn = void (*)(const float* dy, int64_t M, int64_t lddy, const Weight4& w,
                                   float* dx, int64_t lddx, int nthreads);
// Which code path a call of these sizes takes ("scalar"; "gemv": streaming few-row path;
// "gemv-256": the same with 256-bit chunks on the AVX-512 build, for K = 64 * odd;
// "gemm": decoded panels + micro-kernel): lets the tests prove they reach every path.
using Linear4PlanFn = const char* (*)(int64_t M, const Weight4& w, bool backward);

struct Linear4Kernels {
  Linear4ForwardFn forward;
  Linear4BackwardFn backward_input;
  Linear4PlanFn plan;
};
const Linear4Kernels& linear4_kernels();  // the current ISA path (dispatch.h)

void linear4_forward_scalar(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias,
                            float* y, int64_t ldy, int nthreads);
void linear4_backward_input_scalar(const float* dy, int64_t M, int64_t lddy, const Weight4& w, float* dx,
                                   int64_t lddx, int nthreads);
const char* linear4_plan_scalar(int64_t M, const Weight4& w, bool backward);

#if defined(QK_X86)
void linear4_forward_avx2(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias,
                          float* y, int64_t ldy, int nthreads);
void linear4_backward_input_avx2(const float* dy, int64_t M, int64_t lddy, const Weight4& w, float* dx,
                                 int64_t lddx, int nthreads);
const char* linear4_plan_avx2(int64_t M, const Weight4& w, bool backward);

void linear4_forward_avx512(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias,
                            float* y, int64_t ldy, int nthreads);
void linear4_backward_input_avx512(const float* dy, int64_t M, int64_t lddy, const Weight4& w, float* dx,
                                   int64_t lddx, int nthreads);
const char* linear4_plan_avx512(int64_t M, const Weight4& w, bool backward);
#endif

// ---- scratch accounting -------------------------------------------------------------
// Each call owns a ScratchMeter; every per-call buffer is a ScratchBuf charged to it. The
// meter's high-water mark (summed over the threads of the call) feeds a process-wide
// maximum, so a test can assert that no call ever held anything near N*K floats.
// Defined out of line (linear4_scratch.cpp, baseline ISA) so that no std:: template gets
// instantiated inside an ISA-flagged translation unit.
class ScratchMeter {
 public:
  ScratchMeter();
  ~ScratchMeter();  // publishes the peak
  ScratchMeter(const ScratchMeter&) = delete;
  ScratchMeter& operator=(const ScratchMeter&) = delete;
  void charge(int64_t bytes);
  void release(int64_t bytes);

 private:
  int64_t live_;  // accessed atomically
  int64_t peak_;
};

class ScratchBuf {
 public:
  ScratchBuf(ScratchMeter& meter, int64_t nfloats);  // 64-byte aligned, uninitialized
  ~ScratchBuf();
  ScratchBuf(const ScratchBuf&) = delete;
  ScratchBuf& operator=(const ScratchBuf&) = delete;
  float* data() const { return p_; }

 private:
  ScratchMeter& meter_;
  float* p_;
  int64_t bytes_;
};

int64_t linear4_peak_scratch_bytes();
void linear4_reset_peak_scratch();

}  // namespace qk
