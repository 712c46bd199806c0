// Scalar reference path of the 4-bit kernels: every SIMD path is tested against it
// (and it against the pure-torch reference backend). Plain loops, no intrinsics.
#include "quant4_common.h"

namespace qk {
namespace {

template <class L>
int64_t quantize_impl(const void* x, int64_t n, int64_t bs, const Quant4Tables& t,
                      uint8_t* packed, float* absmax, int nthreads) {
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t full = n / bs;
  int64_t bad = -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(max : bad)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs;
    const int64_t len = std::min(bs, n - start);
    float amax = 0.f;
    bool finite = true;
    for (int64_t i = 0; i < len; ++i) {
      const float a = std::fabs(L::at(x, start + i));
      finite &= (a <= 3.402823466e38f);  // false for NaN and Inf
      amax = std::max(amax, a);
    }
    if (!finite) bad = std::max(bad, nblocks - b);
    const BlockScale sc(amax, b >= full);
    absmax[b] = sc.stored;
    quantize4_tail<L>(x, start, 0, len, sc, t, packed);
  }
  return first_bad_block(bad, nblocks);
}

template <class S>
void dequantize_impl(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                     int64_t bs, void* out, int nthreads) {
  const int64_t nblocks = (n + bs - 1) / bs;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs;
    dequantize4_tail<S>(packed, absmax[b], code, start, 0, std::min(bs, n - start), out);
  }
}

}  // namespace

int64_t quantize4_scalar(const void* x, DType xt, int64_t n, int64_t blocksize,
                         const Quant4Tables& t, uint8_t* packed, float* absmax, int nthreads) {
  switch (xt) {
    case DType::F32: return quantize_impl<LoadF32>(x, n, blocksize, t, packed, absmax, nthreads);
    case DType::BF16: return quantize_impl<LoadBF16>(x, n, blocksize, t, packed, absmax, nthreads);
    case DType::F16: return quantize_impl<LoadF16>(x, n, blocksize, t, packed, absmax, nthreads);
  }
  return -1;
}

void dequantize4_scalar(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                        int64_t blocksize, void* out, DType ot, int nthreads) {
  switch (ot) {
    case DType::F32: return dequantize_impl<StoreF32>(packed, absmax, code, n, blocksize, out, nthreads);
    case DType::BF16: return dequantize_impl<StoreBF16>(packed, absmax, code, n, blocksize, out, nthreads);
    case DType::F16: return dequantize_impl<StoreF16>(packed, absmax, code, n, blocksize, out, nthreads);
  }
}

}  // namespace qk
