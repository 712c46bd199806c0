// AVX-512 (F+BW+VL+DQ) paths of the 4-bit kernels.
//
// Dequantization to fp32: one vpermps is a whole 16-entry lookup, and the block's absmax is
// folded into the 16-entry table once per block (code * absmax, rounded once, as the scalar
// rule computes every element), so each 16 outputs cost a byte shuffle, a widening, a
// shift and a lookup; the AVX2 path needs ~4x the work and ran at half the memory
// bandwidth here. Other output dtypes stay on the AVX2 path.
//
// Quantization (fp32/bf16/fp16 input): the block scaling of quant4_common.h's BlockScale
// on 16 lanes, then the bucket of each scaled value by a 4-level binary search over the 15
// bounds in which every level's pivot is one vpermps of the padded bound table and every
// step a compare into a mask (the AVX2 path emulates this with permutes of half tables
// and blends), and the nibbles packed by vpmovqb. Same compares, same bucket: the bytes
// equal the scalar path's.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant4_common.h"

namespace qk {
namespace {

// 16 nibble indices of 8 packed bytes in element order (even element = high nibble), one
// per dword; bits above 3 are left as garbage: vpermps reads only bits 0-3.
inline __m512i indices16(const uint8_t* p) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i dup = _mm_shuffle_epi8(raw, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
  const __m512i shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  return _mm512_srlv_epi32(_mm512_cvtepu8_epi32(dup), shifts);
}

template <bool Stream>
void dequantize_f32(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t bs,
                    float* out, int nthreads) {
  const int64_t nblocks = (n + bs - 1) / bs;
  const __m512 base = _mm512_loadu_ps(code);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs;
    const int64_t len = bs < n - start ? bs : n - start;
    const int64_t vlen = len & ~int64_t(15);
    const __m512 tab = _mm512_mul_ps(base, _mm512_set1_ps(absmax[b]));
    for (int64_t i = 0; i < vlen; i += 16) {
      const __m512 v = _mm512_permutexvar_ps(indices16(packed + (start + i) / 2), tab);
      if (Stream)
        _mm512_stream_ps(out + start + i, v);
      else
        _mm512_storeu_ps(out + start + i, v);
    }
    dequantize4_tail<StoreF32>(packed, absmax[b], code, start, vlen, len, out);
  }
  if (Stream) _mm_sfence();
}

struct ZLoadF32 {
  using Scalar = LoadF32;
  static __m512 load16(const void* p, int64_t i) { return _mm512_loadu_ps(static_cast<const float*>(p) + i); }
};
struct ZLoadBF16 {
  using Scalar = LoadBF16;
  static __m512 load16(const void* p, int64_t i) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
};
struct ZLoadF16 {
  using Scalar = LoadF16;
  static __m512 load16(const void* p, int64_t i) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
  }
};

struct Encoder16 {
  __m512 bounds;  // the 15 ascending bounds, lane 15 unused (no level's pivot reaches it)
  __m512 mid;     // bounds[7], the first level's pivot for every lane
  __m512i order;
  bool identity, clamp;
  explicit Encoder16(const Quant4Tables& t) {
    alignas(64) float b[16];
    alignas(64) int32_t o[16];
    identity = true;
    for (int k = 0; k < 16; ++k) {
      b[k] = k < 15 ? t.bounds[k] : t.bounds[14];
      o[k] = t.order[k];
      identity &= (t.order[k] == k);
    }
    bounds = _mm512_load_ps(b);
    mid = _mm512_set1_ps(t.bounds[7]);
    order = _mm512_load_si512(o);
    // Clamping a finite scaled value to [-1, 1] cannot change its bucket when every bound
    // lies strictly inside (-1, 1), as for codebooks spanning [-1, 1] (NF4 and FP4): values
    // past +-1 (a rounding of v * (1/absmax)) have the same bounds below them as +-1.
    clamp = !(t.bounds[0] > -1.f && t.bounds[14] < 1.f);
  }
  // torch.bucketize(right=False): the count of bounds strictly below s. Level `step`
  // compares s with bounds[idx + step - 1] and adds step where that bound is below.
  __m512i encode(__m512 s) const {
    if (clamp) s = _mm512_min_ps(_mm512_max_ps(s, _mm512_set1_ps(-1.f)), _mm512_set1_ps(1.f));
    __m512i idx = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(mid, s, _CMP_LT_OQ), _mm512_set1_epi32(8));
    for (int step : {4, 2, 1}) {
      const __m512 pivot = _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(step - 1)), bounds);
      const __mmask16 below = _mm512_cmp_ps_mask(pivot, s, _CMP_LT_OQ);
      idx = _mm512_mask_add_epi32(idx, below, idx, _mm512_set1_epi32(step));
    }
    return identity ? idx : _mm512_permutexvar_epi32(idx, order);
  }
};

// 16 nibble indices (int32 lanes, element order) into 8 bytes, even element high: in each
// 64-bit lane the even index sits in the low dword, so (lane << 4) | (lane >> 32) holds
// the byte in its low 8 bits, and vpmovqb narrows the 8 lanes.
inline void pack16(__m512i idx, uint8_t* out) {
  const __m512i byte = _mm512_or_si512(_mm512_slli_epi64(idx, 4), _mm512_srli_epi64(idx, 32));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm512_cvtepi64_epi8(byte));
}

template <class V>
int64_t quantize_impl(const void* x, int64_t n, int64_t bs, const Quant4Tables& t, uint8_t* packed, float* absmax,
                      int nthreads) {
  using L = typename V::Scalar;
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t full = n / bs;
  const Encoder16 enc(t);
  int64_t bad = -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(max : bad)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs;
    const int64_t len = std::min(bs, n - start);
    const int64_t vlen = len & ~int64_t(15);
    // |x| as unsigned integers orders as the floats do, and every Inf or NaN is above the
    // largest finite value: one integer max finds the absmax and any non-finite element.
    __m512i vmax = _mm512_setzero_si512();
    for (int64_t i = 0; i < vlen; i += 16)
      vmax = _mm512_max_epu32(vmax, _mm512_castps_si512(_mm512_abs_ps(V::load16(x, start + i))));
    const uint32_t mbits = _mm512_reduce_max_epu32(vmax);
    bool finite = mbits <= 0x7f7fffffu;
    float amax;
    std::memcpy(&amax, &mbits, sizeof amax);
    for (int64_t i = vlen; i < len; ++i) {
      const float a = std::fabs(L::at(x, start + i));
      finite &= (a <= 3.402823466e38f);
      amax = std::max(amax, a);
    }
    if (!finite) bad = std::max(bad, nblocks - b);
    const BlockScale sc(amax, b >= full);
    absmax[b] = sc.stored;
    const __m512 inv = _mm512_set1_ps(sc.inv), div = _mm512_set1_ps(sc.floored);
    for (int64_t i = 0; i < vlen; i += 16) {
      const __m512 v = V::load16(x, start + i);
      pack16(enc.encode(sc.tail ? _mm512_div_ps(v, div) : _mm512_mul_ps(v, inv)), packed + (start + i) / 2);
    }
    quantize4_tail<L>(x, start, vlen, len, sc, t, packed);
  }
  return first_bad_block(bad, nblocks);
}

}  // namespace

int64_t quantize4_avx512(const void* x, DType xt, int64_t n, int64_t blocksize, const Quant4Tables& t,
                         uint8_t* packed, float* absmax, int nthreads) {
  switch (xt) {
    case DType::F32: return quantize_impl<ZLoadF32>(x, n, blocksize, t, packed, absmax, nthreads);
    case DType::BF16: return quantize_impl<ZLoadBF16>(x, n, blocksize, t, packed, absmax, nthreads);
    case DType::F16: return quantize_impl<ZLoadF16>(x, n, blocksize, t, packed, absmax, nthreads);
  }
  return -1;
}

void dequantize4_avx512(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                        void* out, DType ot, int nthreads) {
  if (ot != DType::F32) return dequantize4_avx2(packed, absmax, code, n, blocksize, out, ot, nthreads);
  float* o = static_cast<float*>(out);
  // Non-temporal stores only pay off when the output cannot stay in cache anyway; whole
  // 64-byte lines need a 64-byte aligned output (block starts are multiples of 16 floats).
  if (n * 4 >= (int64_t(32) << 20) && (reinterpret_cast<uintptr_t>(out) & 63) == 0)
    return dequantize_f32<true>(packed, absmax, code, n, blocksize, o, nthreads);
  dequantize_f32<false>(packed, absmax, code, n, blocksize, o, nthreads);
}

}  // namespace qk
