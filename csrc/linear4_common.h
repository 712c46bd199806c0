// Scalar pieces of the fused 4-bit linear kernels shared by every ISA path. Everything
// here has internal linkage (anonymous namespace): this header is compiled into
// ISA-flagged files too, and an inline function with external linkage would let the
// linker keep an AVX-512 copy and call it from the scalar path.
#pragma once
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "linear4.h"

namespace qk {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Nibble of flat element i (even i: high nibble).
inline int nibble_at(const uint8_t* packed, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0x0f) : (byte >> 4);
}

// Walks the blocks of a flat range without a division per element.
struct BlockCursor {
  int64_t block, left;  // current block, elements left in it
  BlockCursor(int64_t i, int64_t bs) : block(i / bs), left(bs - i % bs) {}
  void advance(int64_t n, int64_t bs) {
    left -= n;
    while (left <= 0) {
      left += bs;
      ++block;
    }
  }
};

// Wd[i0 .. i0+len) into out[0 .. len), exactly as dequantize_4bit computes it.
inline void decode_scalar(const Weight4& w, int64_t i0, int64_t len, float* out) {
  BlockCursor bc(i0, w.blocksize);
  int64_t t = 0;
  while (t < len) {
    const int64_t run = imin(bc.left, len - t);
    const float a = w.absmax[bc.block];
    for (int64_t u = 0; u < run; ++u) out[t + u] = w.code[nibble_at(w.packed, i0 + t + u)] * a;
    t += run;
    bc.advance(run, w.blocksize);
  }
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Threads to use for `units` independent pieces of work.
inline int threads_for(int64_t units, int nthreads) {
  return static_cast<int>(imax(1, imin(units, nthreads)));
}

}  // namespace
}  // namespace qk
