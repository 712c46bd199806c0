// AVX2 path of the int8-compute linear (linear4_q8.h), for CPUs without AVX-512 VNNI.
// Per 64-element chunk (32 packed bytes): vpshufb looks the low and high nibbles up in the
// signed int8 codebook; vpmaddubsw needs an unsigned operand, so the codes go in as |code8|
// and x takes their signs (vpsignb), which keeps each pair sum within int16 (2 * 127 * 127
// < 2^15: +128-offset codes would saturate); vpmaddwd then adds pairs into 8 int32 lanes
// (lane j: elements 8j .. 8j+7, as on the AVX-512 path). The activation quantizer is the
// portable one (linear4_q8_common.h), so xq and sx are those of every other path. For
// more than one row of x, each chunk of W is looked up once for groups of 4 rows.
#include <immintrin.h>

#include "linear4_q8_common.h"
#include "linear4_simd.h"

namespace qk {
namespace {

constexpr int64_t kChunk8 = 64;

// The signed int8 codebook in both 128-bit lanes (vpshufb looks up within a lane).
__m256i code_table(const Weight4Q8& w) {
  alignas(32) int8_t t8[32];
  for (int j = 0; j < 32; ++j) t8[j] = w.code8[j % 16];
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(t8));
}

// xq (K bytes) in the nibbles' order: hi[t] = xq[2t] (the high nibble of byte t), lo[t] = xq[2t + 1].
void split_nibble_order(const int8_t* xq, int64_t K, int8_t* lo, int8_t* hi) {
  for (int64_t t = 0; t < K / 2; ++t) {
    hi[t] = xq[2 * t];
    lo[t] = xq[2 * t + 1];
  }
}

// Quantized rows of x: xlo/xhi K / 2 bytes per row, sx one float per group per row.
struct XRows8 {
  const int8_t *lo, *hi;
  const float* sx;
  int64_t half, groups;  // row strides
};

// out[r] = weight row n . row m0 + r of x, for R rows of x sharing every lookup of W.
// NB: blocks per chunk (1: blocks of >= 64 elements, 2: blocksize 32).
template <int NB, int R>
void rows_dot_avx2(const Weight4Q8& w, int64_t n, const XRows8& xs, int64_t m0, __m256i tab, float* out) {
  const int64_t K = w.K, bs = w.blocksize;
  const int sh = __builtin_ctzll(static_cast<uint64_t>(bs));
  const bool pow2 = (bs & (bs - 1)) == 0;
  const auto blk = [=](int64_t i) { return pow2 ? (i >> sh) : i / bs; };
  const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const uint8_t* row = w.packed + n * K / 2;
  const int64_t i0 = n * K;
  __m256 f[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) f[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < K; c += kChunk8) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c / 2));
    const __m256i clo = _mm256_shuffle_epi8(tab, _mm256_and_si256(raw, m4));
    const __m256i chi = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
    const __m256i alo = _mm256_sign_epi8(clo, clo), ahi = _mm256_sign_epi8(chi, chi);
    const int64_t b = blk(i0 + c), g = c / bs;
    const float a0 = w.absmax[b], a1 = NB == 1 ? a0 : w.absmax[b + 1];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs.lo + m * xs.half + c / 2));
      const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs.hi + m * xs.half + c / 2));
      const __m256i plo = _mm256_maddubs_epi16(alo, _mm256_sign_epi8(xl, clo));
      const __m256i phi = _mm256_maddubs_epi16(ahi, _mm256_sign_epi8(xh, chi));
      const __m256i acc = _mm256_add_epi32(_mm256_madd_epi16(plo, ones), _mm256_madd_epi16(phi, ones));
      const float* sx = xs.sx + m * xs.groups;
      // blocksize 32: lanes 0-3 and 4-7 have their own block and x group
      const __m256 s = NB == 1 ? _mm256_set1_ps(a0 * sx[g])
                               : _mm256_setr_m128(_mm_set1_ps(a0 * sx[g]), _mm_set1_ps(a1 * sx[g + 1]));
      f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, f[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) out[r] = hsum(f[r]);
}

template <int NB>
void rows_dot_avx2_any(int rows, const Weight4Q8& w, int64_t n, const XRows8& xs, int64_t m0, __m256i tab,
                       float* out) {
  for (; rows >= 4; rows -= 4, m0 += 4, out += 4) rows_dot_avx2<NB, 4>(w, n, xs, m0, tab, out);
  for (; rows > 0; --rows, ++m0, ++out) rows_dot_avx2<NB, 1>(w, n, xs, m0, tab, out);
}

// One row of the repacked weight (linear4_q8.h) against x in the same byte order. Each
// 64-byte vector of a panel is two ymm halves whose int32 lanes stay in blocks 16p + 0..7
// and 16p + 8..15, so the panel's 16 block scales meet two converted vectors once, not one
// scale per 64 weights. The sign transfer runs the other way round from the chunked kernel
// above: x is fixed for the whole row, so |xq| (vpmaddubsw's unsigned operand) is made once
// per row of x and only the codes take x's signs (codes are never -128: linear4_q8.h).
// Per 64 weights: 3 operations split the nibbles, 2 lookups, 2 vpsignb, 2 vpmaddubsw,
// 2 vpmaddwd, 2 adds: 13 (and 5 loads), against ~20 with the chunked kernel's extra signs
// and per-chunk scale (and 3 loads): 0.24 -> 0.15 ms at M=1 4096x4096.
float row_dot_repacked(const uint8_t* row, const float* absmax, int64_t nb, int64_t V, const int8_t* xlo,
                       const int8_t* xhi, const uint8_t* alo, const uint8_t* ahi, const float* sx, __m256i tab) {
  const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const auto ld = [](const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  // the 8 int32 lanes of xq * code over one 32-byte half (64 weights)
  const auto half = [&](__m256i raw, uint64_t o) {
    const __m256i cl = _mm256_shuffle_epi8(tab, _mm256_and_si256(raw, m4));
    const __m256i ch = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
    const __m256i pl = _mm256_maddubs_epi16(ld(alo + o), _mm256_sign_epi8(cl, ld(xlo + o)));
    const __m256i ph = _mm256_maddubs_epi16(ld(ahi + o), _mm256_sign_epi8(ch, ld(xhi + o)));
    return _mm256_add_epi32(_mm256_madd_epi16(pl, ones), _mm256_madd_epi16(ph, ones));
  };
  __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
  const uint64_t panels = static_cast<uint64_t>(ceil_div(nb, kQ8PanelBlocks)), step = static_cast<uint64_t>(V) * 64;
  for (uint64_t p = 0; p < panels; ++p) {
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    const uint64_t base = p * step;
    for (uint64_t o = base; o < base + step; o += 64) {
      a0 = _mm256_add_epi32(a0, half(ld(row + o), o));
      a1 = _mm256_add_epi32(a1, half(ld(row + o + 32), o + 32));
    }
    // The last panel of a row may hold fewer than 16 blocks: masked loads keep absmax reads
    // inside the row (the padded lanes have xq = 0 and sx = 0).
    const int64_t left = nb - static_cast<int64_t>(p) * kQ8PanelBlocks;
    const float* am = absmax + p * kQ8PanelBlocks;
    const float* sp = sx + p * kQ8PanelBlocks;
    __m256 s0, s1;
    if (left >= kQ8PanelBlocks) {
      s0 = _mm256_loadu_ps(am);
      s1 = _mm256_loadu_ps(am + 8);
    } else {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i n = _mm256_set1_epi32(static_cast<int>(left));
      s0 = _mm256_maskload_ps(am, _mm256_cmpgt_epi32(n, lane));
      s1 = _mm256_maskload_ps(am + 8, _mm256_cmpgt_epi32(n, _mm256_add_epi32(lane, _mm256_set1_epi32(8))));
    }
    f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_mul_ps(s0, _mm256_loadu_ps(sp)), f0);
    f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_mul_ps(s1, _mm256_loadu_ps(sp + 8)), f1);
  }
  return hsum(_mm256_add_ps(f0, f1));
}

}  // namespace

void linear4_q8_forward_repacked_avx2(const float* x, int64_t M, int64_t ldx, const uint8_t* repacked,
                                      const Weight4Q8& w, const float* bias, float* y, int64_t ldy, int nthreads) {
  const int64_t N = w.N, K = w.K, bs = w.blocksize, nb = K / bs, V = bs / 8;
  const int64_t panels = ceil_div(nb, kQ8PanelBlocks), row_bytes = panels * kQ8PanelBlocks * (bs / 2);
  const __m256i tab = code_table(w);
  ScratchMeter meter;
  // xq (K bytes), its nibble-order halves (K / 2 each), their repacked copies and those
  // copies' magnitudes (row_bytes each), then the scales: nb per group, 16 per panel.
  ScratchBuf buf(meter, (2 * K + 4 * row_bytes) / 4 + 1 + nb + panels * kQ8PanelBlocks);
  int8_t* xq = reinterpret_cast<int8_t*>(buf.data());
  int8_t* nlo = xq + K;
  int8_t* nhi = nlo + K / 2;
  int8_t* rlo = nhi + K / 2;
  int8_t* rhi = rlo + row_bytes;
  uint8_t* alo = reinterpret_cast<uint8_t*>(rhi + row_bytes);
  uint8_t* ahi = alo + row_bytes;
  float* sxg = buf.data() + (2 * K + 4 * row_bytes) / 4 + 1;
  float* rsx = sxg + nb;
  // read only by the OpenMP pragma below (the ONNX Runtime library builds without OpenMP)
  [[maybe_unused]] const int T = threads_for(ceil_div(N, 16), nthreads);
  for (int64_t m = 0; m < M; ++m) {
    quantize_x_groups(x + m * ldx, K, bs, xq, sxg);
    split_nibble_order(xq, K, nlo, nhi);
    // x's bytes in the weight's repacked order (the same permutation, one row of K / 2 bytes)
    linear4_q8_repack(reinterpret_cast<const uint8_t*>(nlo), 1, K, bs, reinterpret_cast<uint8_t*>(rlo), 1);
    linear4_q8_repack(reinterpret_cast<const uint8_t*>(nhi), 1, K, bs, reinterpret_cast<uint8_t*>(rhi), 1);
    for (int64_t i = 0; i < row_bytes; ++i) {  // |xq| <= 127: no overflow at -128
      alo[i] = static_cast<uint8_t>(rlo[i] < 0 ? -rlo[i] : rlo[i]);
      ahi[i] = static_cast<uint8_t>(rhi[i] < 0 ? -rhi[i] : rhi[i]);
    }
    for (int64_t b = 0; b < panels * kQ8PanelBlocks; ++b) rsx[b] = b < nb ? sxg[b] : 0.f;
    float* ym = y + m * ldy;
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float d =
          row_dot_repacked(repacked + n * row_bytes, w.absmax + n * nb, nb, V, rlo, rhi, alo, ahi, rsx, tab);
      ym[n] = bias ? d + bias[n] : d;
    }
  }
}

bool linear4_q8_avx2_fits(const Weight4Q8& w) {
  const int64_t bs = w.blocksize;
  // A chunk meets one block and one x group, or two of each at 32-element boundaries.
  return w.K % kChunk8 == 0 && (bs % kChunk8 == 0 || bs == 32);
}

// Tiles of kTileRows rows of x are quantized together; each thread takes a range of
// weight rows in L2-sized blocks of kBlockN and runs them against groups of 4 rows of x.
constexpr int64_t kTileRows8 = 64, kBlockN8 = 256;

void linear4_q8_forward_avx2(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias,
                             float* y, int64_t ldy, int nthreads) {
  const int64_t N = w.N, K = w.K, bs = w.blocksize, ng = ceil_div(K, bs);
  const int64_t mt_max = imin(kTileRows8, M);
  ScratchMeter meter;
  // Per row: xq (K bytes), xlo and xhi (K / 2 bytes each), then sx (one float per group).
  ScratchBuf buf(meter, mt_max * (K / 2 + ng));
  int8_t* xq = reinterpret_cast<int8_t*>(buf.data());
  int8_t* xlo = xq + mt_max * K;
  int8_t* xhi = xlo + mt_max * (K / 2);
  float* sx = buf.data() + mt_max * (K / 2);
  const XRows8 xs{xlo, xhi, sx, K / 2, ng};
  const __m256i tab = code_table(w);
  const int T = threads_for(ceil_div(N, 16), nthreads);
  for (int64_t m0 = 0; m0 < M; m0 += kTileRows8) {
    const int64_t mt = imin(kTileRows8, M - m0);
    for (int64_t r = 0; r < mt; ++r) {
      int8_t* q = xq + r * K;
      quantize_x_groups(x + (m0 + r) * ldx, K, bs, q, sx + r * ng);
      split_nibble_order(q, K, xlo + r * (K / 2), xhi + r * (K / 2));
    }
    // per column range, not per thread id: OpenMP may run fewer threads than asked (linear4_gemm.h)
#pragma omp parallel for schedule(static, 1) num_threads(T)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t nb = N * t / T, ne = N * (t + 1) / T;
      float d[4];
      for (int64_t n0 = nb; n0 < ne; n0 += kBlockN8) {
        for (int64_t g = 0; g < mt; g += 4) {
          const int rows = static_cast<int>(imin(4, mt - g));
          for (int64_t n = n0; n < imin(ne, n0 + kBlockN8); ++n) {
            if (bs == 32)
              rows_dot_avx2_any<2>(rows, w, n, xs, g, tab, d);
            else
              rows_dot_avx2_any<1>(rows, w, n, xs, g, tab, d);
            for (int r = 0; r < rows; ++r) y[(m0 + g + r) * ldy + n] = bias ? bias[n] + d[r] : d[r];
          }
        }
      }
    }
  }
}

}  // namespace qk
