// Machine limits, measured on the machine at hand: the fp32 FMA throughput of each ISA
// path and the read bandwidth of a buffer of a given size. Kernels are then reported as a
// fraction of these (as BLIS and oneDNN report theirs): a time is not comparable across
// machines, a fraction of the ISA's peak is.
#pragma once
#include <cstdint>

namespace qk {

// One thread runs `iters` iterations of independent FMA chains (enough chains to hide the
// FMA latency on the cores seen: 12) and returns a value that depends on every chain, so
// nothing is optimized away. kPeakFlopsPerIter* give the flops of one iteration.
float fma_chains_scalar(int64_t iters, float seed);  // SSE2 mul+add (the baseline build), 4 lanes
float fma_chains_avx2(int64_t iters, float seed);    // ymm FMA, 8 lanes
float fma_chains_avx512(int64_t iters, float seed);  // zmm FMA, 16 lanes
constexpr int kPeakChains = 12;
constexpr int64_t kPeakFlopsPerIterScalar = kPeakChains * 4 * 2;
constexpr int64_t kPeakFlopsPerIterAvx2 = kPeakChains * 8 * 2;
constexpr int64_t kPeakFlopsPerIterAvx512 = kPeakChains * 16 * 2;

// Sum of n floats (n a multiple of 64, p 64-byte aligned) with the widest loads of the path
// and enough accumulators to keep two loads a cycle in flight.
float read_sum_scalar(const float* p, int64_t n);
float read_sum_avx2(const float* p, int64_t n);

}  // namespace qk
