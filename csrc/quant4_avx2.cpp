// AVX2+FMA+F16C path of the 4-bit kernels. Built with its own flags (setup.py) and
// only called after cpuid says the CPU has these extensions. Vector loops cover
// 16-element chunks of a block; the rest goes through the scalar tail in
// quant4_common.h, so a block tail is encoded exactly as on the scalar path.
#include <immintrin.h>

#include <cstring>

#include "quant4_common.h"

namespace qk {
namespace {

struct VLoadF32 {
  using Scalar = LoadF32;
  static __m256 load8(const void* p, int64_t i) { return _mm256_loadu_ps(static_cast<const float*>(p) + i); }
};
struct VLoadBF16 {
  using Scalar = LoadBF16;
  static __m256 load8(const void* p, int64_t i) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
};
struct VLoadF16 {
  using Scalar = LoadF16;
  static __m256 load8(const void* p, int64_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
};

// 16-entry table lookup: two in-lane permutes, chosen by bit 3 of the index.
inline __m256 lookup16(__m256 lo, __m256 hi, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline __m256i lookup16_i(__m256i lo, __m256i hi, __m256i idx) {
  const __m256i a = _mm256_permutevar8x32_epi32(lo, idx);
  const __m256i b = _mm256_permutevar8x32_epi32(hi, idx);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
}

struct Tables8 {
  // Binary search over the 15 ascending bounds, 4 levels: the pivot of each level is
  // bounds[idx + step - 1], fetched by one in-register permute (at most 8 candidates).
  __m256 pivot8, pivot4, pivot2, pivot1;
  __m256i order_lo, order_hi;
  bool identity, clamp;
  explicit Tables8(const Quant4Tables& t) {
    // Clamping a finite scaled value to [-1, 1] cannot change its bucket when every bound
    // lies strictly inside (-1, 1), as for codebooks spanning [-1, 1] (NF4 and FP4).
    clamp = !(t.bounds[0] > -1.f && t.bounds[14] < 1.f);
    alignas(32) float p4[8] = {t.bounds[3], t.bounds[11]};
    alignas(32) float p2[8] = {t.bounds[1], t.bounds[5], t.bounds[9], t.bounds[13]};
    alignas(32) float p1[8];
    for (int k = 0; k < 8; ++k) p1[k] = t.bounds[2 * k];
    pivot8 = _mm256_set1_ps(t.bounds[7]);
    pivot4 = _mm256_load_ps(p4);
    pivot2 = _mm256_load_ps(p2);
    pivot1 = _mm256_load_ps(p1);
    alignas(32) int32_t o[16];
    identity = true;
    for (int k = 0; k < 16; ++k) {
      o[k] = t.order[k];
      identity &= (t.order[k] == k);
    }
    order_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(o));
    order_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(o + 8));
  }
  static __m256i step(__m256i idx, __m256 pivot, __m256 s, int amount) {
    const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(pivot, s, _CMP_LT_OQ));
    return _mm256_add_epi32(idx, _mm256_and_si256(below, _mm256_set1_epi32(amount)));
  }
  // torch.bucketize(right=False): the count of bounds strictly below s.
  __m256i encode(__m256 s) const {
    __m256i idx = step(_mm256_setzero_si256(), pivot8, s, 8);
    idx = step(idx, _mm256_permutevar8x32_ps(pivot4, _mm256_srli_epi32(idx, 3)), s, 4);
    idx = step(idx, _mm256_permutevar8x32_ps(pivot2, _mm256_srli_epi32(idx, 2)), s, 2);
    idx = step(idx, _mm256_permutevar8x32_ps(pivot1, _mm256_srli_epi32(idx, 1)), s, 1);
    return identity ? idx : lookup16_i(order_lo, order_hi, idx);
  }
};

// Packs 16 nibble indices (int32 lanes, element order) into 8 bytes, even element high.
inline void pack16(__m256i a, __m256i b, uint8_t* out) {
  // Within each 64-bit lane: low dword becomes (even << 4) | odd.
  const __m256i ca = _mm256_or_si256(_mm256_slli_epi32(a, 4), _mm256_srli_epi64(a, 32));
  const __m256i cb = _mm256_or_si256(_mm256_slli_epi32(b, 4), _mm256_srli_epi64(b, 32));
  const __m256i sel = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i pa = _mm256_permutevar8x32_epi32(ca, sel);
  const __m256i pb = _mm256_permutevar8x32_epi32(cb, sel);
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(pa), _mm256_castsi256_si128(pb));
  const __m128i bytes = _mm_packus_epi16(_mm_and_si128(w, _mm_set1_epi16(0xff)), _mm_setzero_si128());
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), bytes);
}

inline uint32_t hmax_u32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

template <class V>
int64_t quantize_impl(const void* x, int64_t n, int64_t bs, const Quant4Tables& t,
                      uint8_t* packed, float* absmax, int nthreads) {
  using L = typename V::Scalar;
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t full = n / bs;
  const Tables8 tv(t);
  int64_t bad = -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(max : bad)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs;
    const int64_t len = std::min(bs, n - start);
    const int64_t vlen = len & ~int64_t(15);
    // |x| as unsigned integers orders as the floats do, and every Inf or NaN is above the
    // largest finite value: one integer max finds the absmax and any non-finite element.
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256i vmax = _mm256_setzero_si256();
    for (int64_t i = 0; i < vlen; i += 8)
      vmax = _mm256_max_epu32(vmax, _mm256_castps_si256(_mm256_andnot_ps(sign, V::load8(x, start + i))));
    const uint32_t mbits = hmax_u32(vmax);
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
    const __m256 lo = _mm256_set1_ps(-1.f), hi = _mm256_set1_ps(1.f);
    const __m256 inv = _mm256_set1_ps(sc.inv), div = _mm256_set1_ps(sc.floored);
    for (int64_t i = 0; i < vlen; i += 16) {
      __m256 s0 = V::load8(x, start + i), s1 = V::load8(x, start + i + 8);
      if (sc.tail) {
        s0 = _mm256_div_ps(s0, div);
        s1 = _mm256_div_ps(s1, div);
      } else {
        s0 = _mm256_mul_ps(s0, inv);
        s1 = _mm256_mul_ps(s1, inv);
      }
      if (tv.clamp) {
        s0 = _mm256_min_ps(_mm256_max_ps(s0, lo), hi);
        s1 = _mm256_min_ps(_mm256_max_ps(s1, lo), hi);
      }
      pack16(tv.encode(s0), tv.encode(s1), packed + (start + i) / 2);
    }
    quantize4_tail<L>(x, start, vlen, len, sc, t, packed);
  }
  return first_bad_block(bad, nblocks);
}

// Expands 8 packed bytes into 16 nibble indices in element order (high nibble first).
inline void unpack16(const uint8_t* p, __m256i& a, __m256i& b) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i dup = _mm_shuffle_epi8(raw, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
  const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  const __m256i m = _mm256_set1_epi32(15);
  a = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(dup), shifts), m);
  b = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(dup, 8)), shifts), m);
}

struct VStoreF32 {
  using Scalar = StoreF32;
  static void put16(void* p, int64_t i, __m256 a, __m256 b, bool stream) {
    float* o = static_cast<float*>(p) + i;
    if (stream) {
      _mm256_stream_ps(o, a);
      _mm256_stream_ps(o + 8, b);
    } else {
      _mm256_storeu_ps(o, a);
      _mm256_storeu_ps(o + 8, b);
    }
  }
};

inline __m256i bf16_round(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(qnan), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

struct VStoreBF16 {
  using Scalar = StoreBF16;
  static void put16(void* p, int64_t i, __m256 a, __m256 b, bool) {
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_round(a), bf16_round(b)), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), packed);
  }
};

struct VStoreF16 {
  using Scalar = StoreF16;
  static void put16(void* p, int64_t i, __m256 a, __m256 b, bool) {
    uint16_t* o = static_cast<uint16_t*>(p) + i;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 8), _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT));
  }
};

template <class V>
void dequantize_impl(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                     int64_t bs, void* out, int nthreads) {
  using S = typename V::Scalar;
  const int64_t nblocks = (n + bs - 1) / bs;
  const __m256 clo = _mm256_loadu_ps(code), chi = _mm256_loadu_ps(code + 8);
  // Non-temporal stores only pay off when the output cannot stay in cache anyway.
  const bool stream = n * 4 >= (int64_t(32) << 20) && (reinterpret_cast<uintptr_t>(out) & 31) == 0;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs;
    const int64_t len = std::min(bs, n - start);
    const int64_t vlen = len & ~int64_t(15);
    const __m256 scale = _mm256_set1_ps(absmax[b]);
    for (int64_t i = 0; i < vlen; i += 16) {
      __m256i ia, ib;
      unpack16(packed + (start + i) / 2, ia, ib);
      V::put16(out, start + i, _mm256_mul_ps(lookup16(clo, chi, ia), scale),
               _mm256_mul_ps(lookup16(clo, chi, ib), scale), stream);
    }
    dequantize4_tail<S>(packed, absmax[b], code, start, vlen, len, out);
  }
  if (stream) _mm_sfence();
}

}  // namespace

int64_t quantize4_avx2(const void* x, DType xt, int64_t n, int64_t blocksize,
                       const Quant4Tables& t, uint8_t* packed, float* absmax, int nthreads) {
  switch (xt) {
    case DType::F32: return quantize_impl<VLoadF32>(x, n, blocksize, t, packed, absmax, nthreads);
    case DType::BF16: return quantize_impl<VLoadBF16>(x, n, blocksize, t, packed, absmax, nthreads);
    case DType::F16: return quantize_impl<VLoadF16>(x, n, blocksize, t, packed, absmax, nthreads);
  }
  return -1;
}

void dequantize4_avx2(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                      int64_t blocksize, void* out, DType ot, int nthreads) {
  switch (ot) {
    case DType::F32: return dequantize_impl<VStoreF32>(packed, absmax, code, n, blocksize, out, nthreads);
    case DType::BF16: return dequantize_impl<VStoreBF16>(packed, absmax, code, n, blocksize, out, nthreads);
    case DType::F16: return dequantize_impl<VStoreF16>(packed, absmax, code, n, blocksize, out, nthreads);
  }
}

}  // namespace qk
