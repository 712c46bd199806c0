// 256-bit decoding helpers of the fused 4-bit linear kernels, for the ISA-flagged files
// only (linear4_*_avx2.cpp, linear4_*_avx512.cpp). Internal linkage throughout, so each
// ISA file gets its own copy compiled with its own flags.
//
// Two decoders:
//  * element order (codes16/decode_span): any flat start (odd starts, blocks straddling
//    rows), used for row-major panels and as the fallback;
//  * the "dword" order (nib<S>): 32 packed bytes read as 8 dwords; shifting every dword
//    right by 4*S leaves, in its low nibble, element 8j + (S ^ 1) of the 64-element chunk
//    (little-endian: byte t holds elements 2t (high) and 2t+1 (low)). A lookup then needs
//    no unpacking at all; callers either permute the other operand the same way (GEMV)
//    or transpose (panel packing).
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__)
#error "linear4_simd.h is for the AVX2/AVX-512 translation units only"
#endif
#include <immintrin.h>

#include "linear4_common.h"

namespace qk {
namespace {

constexpr int64_t kAhead = 4;  // rows of software prefetch in the panel decoders

inline void prefetch_span(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
}

// 16-entry fp32 lookup; idx may carry garbage above bit 3.
inline __m256 lut16(__m256 lo, __m256 hi, __m256i idx) {
#if defined(__AVX512VL__)
  return _mm256_permutex2var_ps(lo, idx, hi);  // bit 3 picks the table
#else
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
#endif
}

// Dword-order lookup of nibble S (0..7) of every dword of raw: lane j is element
// 8j + (S ^ 1) of the chunk.
template <int S>
inline __m256 nib(__m256i raw, __m256 lo, __m256 hi) {
  const __m256i idx = S == 0 ? raw : _mm256_srli_epi32(raw, 4 * S);
#if defined(__AVX512VL__)
  return _mm256_permutex2var_ps(lo, idx, hi);
#else
  // Bit 3 of the nibble moved to the sign bit, straight from raw: one shift, not two.
  const __m256i sel = S == 7 ? raw : _mm256_slli_epi32(raw, 28 - 4 * S);
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                          _mm256_castsi256_ps(sel));
#endif
}

// Nibble indices of elements [i, i+16) in element order, any parity of i. Reads bytes
// i/2 .. (i+15)/2 only, so never past the array when i+16 <= N*K.
inline void codes16(const uint8_t* packed, int64_t i, __m256i& a, __m256i& b) {
  const uint8_t* p = packed + (i >> 1);
  __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m128i dup;
  __m256i shifts;
  if (i & 1) {  // starts in a low nibble: the 16 elements span 9 bytes
    raw = _mm_insert_epi8(raw, p[8], 8);
    dup = _mm_shuffle_epi8(raw, _mm_setr_epi8(0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8));
    shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  } else {
    dup = _mm_shuffle_epi8(raw, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
    shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  }
  const __m256i m = _mm256_set1_epi32(15);
  a = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(dup), shifts), m);
  b = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(dup, 8)), shifts), m);
}

// Wd[i0 + t], t in [0, len), stored at dst[(t / CH) * pstride + t % CH]: contiguous when
// pstride == CH, micro-panels of CH columns otherwise. The last chunk is zero-padded to
// CH columns. Values are code * absmax rounded once, exactly as dequantize_4bit.
template <int CH>
void decode_span(const Weight4& w, int64_t i0, int64_t len, float* dst, int64_t pstride) {
  static_assert(CH % 16 == 0, "chunks hold whole 16-element groups");
  const int64_t bs = w.blocksize;
  const __m256 lo = _mm256_loadu_ps(w.code), hi = _mm256_loadu_ps(w.code + 8);
  const __m256i lanes_a = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lanes_b = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
  BlockCursor bc(i0, bs);
  int64_t t = 0;
  if (bs >= 16) {  // at most one block boundary inside 16 elements
    for (; t + 16 <= len; t += 16) {
      __m256i ia, ib;
      codes16(w.packed, i0 + t, ia, ib);
      __m256 sa = _mm256_set1_ps(w.absmax[bc.block]), sb = sa;
      if (bc.left < 16) {
        const __m256 next = _mm256_set1_ps(w.absmax[bc.block + 1]);
        const __m256i cut = _mm256_set1_epi32(static_cast<int>(bc.left));
        sa = _mm256_blendv_ps(next, sa, _mm256_castsi256_ps(_mm256_cmpgt_epi32(cut, lanes_a)));
        sb = _mm256_blendv_ps(next, sb, _mm256_castsi256_ps(_mm256_cmpgt_epi32(cut, lanes_b)));
      }
      const uint64_t ut = static_cast<uint64_t>(t);
      float* o = dst + static_cast<int64_t>(ut / CH) * pstride + static_cast<int64_t>(ut % CH);
      _mm256_storeu_ps(o, _mm256_mul_ps(lut16(lo, hi, ia), sa));
      _mm256_storeu_ps(o + 8, _mm256_mul_ps(lut16(lo, hi, ib), sb));
      bc.advance(16, bs);
    }
  }
  for (; t < len; ++t) {
    dst[(t / CH) * pstride + t % CH] = w.code[nibble_at(w.packed, i0 + t)] * w.absmax[bc.block];
    bc.advance(1, bs);
  }
  for (; t % CH; ++t) dst[(t / CH) * pstride + t % CH] = 0.f;
}

// In-register 8x8 transpose: v[r] lane j -> v[j] lane r.
inline void transpose8(__m256 v[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Block index of flat element i: a shift for power-of-two blocksizes.
struct BlockIndex {
  int64_t bs;
  int shift;  // -1: divide
  explicit BlockIndex(int64_t b) : bs(b), shift(-1) {
    if ((b & (b - 1)) == 0)
      for (shift = 0; (int64_t(1) << shift) < b; ++shift) {
      }
  }
  int64_t operator()(int64_t i) const { return shift >= 0 ? (i >> shift) : i / bs; }
};

// The dword decoder's 64-element chunks are usable when rows start on a chunk and every
// 8-element lane group lies in one block (block boundaries on 8-element groups).
inline bool dword_chunks_ok(const Weight4& w, int64_t chunk) {
  const int64_t bs = w.blocksize;
  return w.K % chunk == 0 && (bs % chunk == 0 || (chunk % bs == 0 && bs % 8 == 0));
}

template <int S>
inline void panel_step(const __m256i raw[8], __m256 lo, __m256 hi, __m256 s_lo, __m256 s_hi, float* out, int nr) {
  __m256 v[8];
  for (int r = 0; r < 8; ++r) v[r] = nib<S>(raw[r], lo, hi);
  transpose8(v);  // v[j]: the 8 rows at chunk column 8j + (S ^ 1)
  for (int j = 0; j < 8; ++j)
    _mm256_storeu_ps(out + (8 * j + (S ^ 1)) * nr, _mm256_mul_ps(v[j], j < 4 ? s_lo : s_hi));
}

// Rows n..n+7, columns [k0, k0 + kc) (k0, kc, K multiples of 64) of Wd, transposed:
// out[k * nr + r] = Wd[n + r, k0 + k]. Needs blocksize % 64 == 0 or == 32.
inline void pack_rows8_transposed(const Weight4& w, const BlockIndex& bi, int64_t n, int64_t k0, int64_t kc,
                                  float* out, int nr) {
  const __m256 lo = _mm256_loadu_ps(w.code), hi = _mm256_loadu_ps(w.code + 8);
  for (int64_t k = 0; k < kc; k += 64) {
    __m256i raw[8];
    alignas(32) float a0[8], a1[8];
    for (int r = 0; r < 8; ++r) {
      const int64_t i = (n + r) * w.K + k0 + k;
      raw[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.packed + i / 2));
      a0[r] = w.absmax[bi(i)];
      a1[r] = w.absmax[bi(i + 32)];  // == a0 unless blocksize is 32
    }
    const __m256 s_lo = _mm256_load_ps(a0), s_hi = _mm256_load_ps(a1);
    float* o = out + k * nr;
    panel_step<0>(raw, lo, hi, s_lo, s_hi, o, nr);
    panel_step<1>(raw, lo, hi, s_lo, s_hi, o, nr);
    panel_step<2>(raw, lo, hi, s_lo, s_hi, o, nr);
    panel_step<3>(raw, lo, hi, s_lo, s_hi, o, nr);
    panel_step<4>(raw, lo, hi, s_lo, s_hi, o, nr);
    panel_step<5>(raw, lo, hi, s_lo, s_hi, o, nr);
    panel_step<6>(raw, lo, hi, s_lo, s_hi, o, nr);
    panel_step<7>(raw, lo, hi, s_lo, s_hi, o, nr);
  }
}

// Micro-panels sit ps = panel_stride(kc, NR) floats apart: kc*NR plus one cache line,
// because at kc*NR*4 bytes (a multiple of 4 KiB) the backward decoder's stores to all
// micro-panels of a row fell into one L1 set and evicted each other.
inline int64_t panel_stride(int64_t kc, int nr) { return kc * nr + 16; }

// Forward B panel (y = x Wd^T): micro-panel q holds output columns n0 + q*NR + r, laid
// out bp[q*ps + k*NR + r] = Wd[n0 + q*NR + r, p0 + k]; rows past n0 + nc are zero.
// tmp: round_up(kc, 16) floats.
template <int NR>
void pack_forward_panel(const Weight4& w, int64_t n0, int64_t nc, int64_t p0, int64_t kc, float* bp, float* tmp) {
  const int64_t ps = panel_stride(kc, NR);
  static_assert(NR % 8 == 0, "rows are decoded 8 at a time");
  const bool fast = dword_chunks_ok(w, 64) && (w.blocksize % 64 == 0 || w.blocksize == 32) && p0 % 64 == 0 &&
                    kc % 64 == 0;
  const BlockIndex bi(w.blocksize);
  for (int64_t q = 0; q * NR < nc; ++q) {
    float* panel = bp + q * ps;
    for (int g = 0; g < NR; g += 8) {
      const int64_t r0 = q * NR + g, rows = imin(8, nc - r0);
      if (fast && rows == 8) {
        // Hundreds of rows are read kc/2 bytes at a time: too many streams for the
        // hardware prefetchers, so fetch the next group of 8 rows now.
        for (int64_t r = r0 + 8; r < imin(r0 + 16, nc); ++r) prefetch_span(w.packed + ((n0 + r) * w.K + p0) / 2, kc / 2);
        pack_rows8_transposed(w, bi, n0 + r0, p0, kc, panel + g, NR);
        continue;
      }
      for (int r = 0; r < 8; ++r) {
        float* col = panel + g + r;
        if (r < rows) {
          decode_span<16>(w, (n0 + r0 + r) * w.K + p0, kc, tmp, 16);
          for (int64_t k = 0; k < kc; ++k) col[k * NR] = tmp[k];
        } else {
          for (int64_t k = 0; k < kc; ++k) col[k * NR] = 0.f;
        }
      }
    }
  }
}

// 64 elements Wd[i .. i+64) of one row in element order, from the 32 packed bytes in raw:
// the eight dword-order lookups, transposed, hold element 8j + (s^1) in lane s of v[j];
// swapping adjacent lanes puts element 8j + s there. a0 scales elements 0..31, a1
// elements 32..63 (they differ only for blocksize 32). With only 16 bytes in raw (upper
// half zero), v[0..3] are elements 0..31.
inline void decode64_ordered(__m256i raw, __m256 lo, __m256 hi, float a0, float a1, __m256 v[8]) {
  v[0] = nib<0>(raw, lo, hi);
  v[1] = nib<1>(raw, lo, hi);
  v[2] = nib<2>(raw, lo, hi);
  v[3] = nib<3>(raw, lo, hi);
  v[4] = nib<4>(raw, lo, hi);
  v[5] = nib<5>(raw, lo, hi);
  v[6] = nib<6>(raw, lo, hi);
  v[7] = nib<7>(raw, lo, hi);
  transpose8(v);
  const __m256 s0 = _mm256_set1_ps(a0), s1 = _mm256_set1_ps(a1);
  for (int j = 0; j < 8; ++j) v[j] = _mm256_mul_ps(_mm256_permute_ps(v[j], 0xb1), j < 4 ? s0 : s1);
}

// Backward B panel (dx = dy Wd): reduction rows n = p0 .. p0+kc, output columns
// k0 .. k0+nc in micro-panels of NR: bp[q*ps + r*NR + t] = Wd[p0 + r, k0 + q*NR + t].
// Column ranges on 32-element boundaries keep the dword decoder: a panel may start or end
// half-way through a 64-element chunk. In units of 64, 576 columns (SmolLM2's K) could
// only split 320 + 256 over two threads, so at M = 512 the grid choice split the rows
// instead and each thread decoded every panel; in units of 32 the columns split 288 + 288.
template <int NR>
void pack_backward_panel(const Weight4& w, int64_t k0, int64_t nc, int64_t p0, int64_t kc, float* bp) {
  static_assert(32 % NR == 0, "a 32-element half chunk fills whole micro-panel rows");
  const bool fast = w.K % 64 == 0 && k0 % 32 == 0 && (w.blocksize % 64 == 0 || w.blocksize == 32);
  const int64_t ps = panel_stride(kc, NR);
  const BlockIndex bi(w.blocksize);
  const __m256 lo = _mm256_loadu_ps(w.code), hi = _mm256_loadu_ps(w.code + 8);
  const auto store = [&](const __m256* v, int n8, int64_t c, int64_t r) {
    for (int j = 0; j < n8; ++j) {
      const int64_t u = c + 8 * j;
      _mm256_storeu_ps(bp + (u / NR) * ps + r * NR + u % NR, v[j]);
    }
  };
  const auto half = [&](int64_t i, int64_t c, int64_t r) {
    // 16 bytes only: a 32-byte load could run past the end of the last row
    const __m256i raw = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + i / 2)));
    __m256 v[8];
    decode64_ordered(raw, lo, hi, w.absmax[bi(i)], 0.f, v);
    store(v, 4, c, r);
  };
  for (int64_t r = 0; r < kc; ++r) {
    const int64_t row = (p0 + r) * w.K + k0;
    // A few hundred bytes per row at a stride of K/2 bytes: the hardware prefetchers
    // miss it, and the loads stalled on L3 latency. Fetch kAhead rows early.
    if (r + kAhead < kc) prefetch_span(w.packed + (row + kAhead * w.K) / 2, (nc + 1) / 2);
    int64_t c = 0;
    if (fast) {
      if (k0 % 64 != 0 && nc >= 32) half(row, 0, r), c = 32;
      for (; c + 64 <= nc; c += 64) {
        const int64_t i = row + c;
        __m256 v[8];
        decode64_ordered(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.packed + i / 2)), lo, hi,
                         w.absmax[bi(i)], w.absmax[bi(i + 32)], v);
        store(v, 8, c, r);
      }
      if (c + 32 <= nc) half(row + c, c, r), c += 32;
    }
    if (c < nc) decode_span<NR>(w, row + c, nc - c, bp + (c / NR) * ps + r * NR, ps);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace
}  // namespace qk
