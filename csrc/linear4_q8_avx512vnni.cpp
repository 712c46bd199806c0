// AVX-512 VNNI + VBMI path of the int8-compute linear (linear4_q8.h). Per 128-element
// chunk of a weight row (64 packed bytes): two vpermb lookups turn the low and high
// nibbles into unsigned codes (code8 + 128), two vpdpbusd multiply them with the
// matching bytes of xq and add groups of four into 16 int32 lanes (lane j: elements
// 8j .. 8j+7), which start from -128 * (their sum of xq) to undo the +128. One convert
// and one FMA per chunk apply absmax_b * sx_g per lane. x is quantized once per call and
// its bytes split into the nibbles' order: xhi[c/2 + t] = xq[c + 2t] (high nibble of byte
// t), xlo[c/2 + t] = xq[c + 2t + 1]. Per 128 elements that is ~10 zmm operations against
// ~26 for the exact fp32 GEMV (linear4_gemv.h), whose lookups are one vpermps per 16.
// One row of x on the repacked weight of linear4_q8.h (row_dot_repacked) drops the
// per-chunk scale work: ~5.5 operations and 3 loads per 128 elements.
#include <immintrin.h>

#include "dispatch.h"
#include "linear4_q8_common.h"

namespace qk {
namespace {

constexpr int64_t kChunk = 128;

// Quantizes one row (as quantize_x_groups, bit for bit: same products, same rounding)
// and lays out xlo/xhi, the per-lane -128 * sum(xq) (corr) and per-lane sx (sxv).
void prepare_row(const float* x, int64_t K, int64_t G, int8_t* xlo, int8_t* xhi, int32_t* corr, float* sxv) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  const __m512i ev = _mm512_set_epi8(126, 124, 122, 120, 118, 116, 114, 112, 110, 108, 106, 104, 102, 100, 98, 96, 94,
                                     92, 90, 88, 86, 84, 82, 80, 78, 76, 74, 72, 70, 68, 66, 64, 62, 60, 58, 56, 54,
                                     52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14,
                                     12, 10, 8, 6, 4, 2, 0);
  const __m512i od = _mm512_add_epi8(ev, _mm512_set1_epi8(1));
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(128));
  alignas(64) int8_t q[kChunk];
  float sx_g = 0.f, inv = 0.f;
  int64_t next = 0;  // the next group's first element: no 64-bit k % G per 16 elements
  for (int64_t c = 0; c < K; c += kChunk) {
    for (int64_t s = 0; s < kChunk; s += 16) {
      const int64_t k = c + s;
      if (k == next) {  // a new group (G is a multiple of 16): its amax and 127 / amax
        next += G;
        __m512 m = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int64_t u = k; u < imin(k + G, K); u += 16) {  // the last group may be short
          const __m512 v = _mm512_loadu_ps(x + u);
          bad |= _mm512_fpclass_ps_mask(v, 0x99);  // NaN (quiet, signalling) or +-Inf
          m = _mm512_max_ps(m, _mm512_andnot_ps(sign, v));
        }
        const float amax = _mm512_reduce_max_ps(m);
        sx_g = bad ? NAN : (amax == 0.f ? 0.f : amax / 16129.f);
        inv = (bad || amax == 0.f) ? 0.f : 127.f / amax;
      }
      // inv == 0 marks a group that quantizes to zeros (x * 0 would keep NaN/Inf).
      const __m512 r = inv == 0.f ? _mm512_setzero_ps()
                                  : _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), _mm512_set1_ps(inv)),
                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 cl = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
      _mm_store_si128(reinterpret_cast<__m128i*>(q + s), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(cl)));
      sxv[(c / kChunk) * 16 + s / 8] = sx_g;
      sxv[(c / kChunk) * 16 + s / 8 + 1] = sx_g;
    }
    const __m512i a = _mm512_load_si512(q), b = _mm512_load_si512(q + 64);
    const __m512i hi = _mm512_permutex2var_epi8(a, ev, b), lo = _mm512_permutex2var_epi8(a, od, b);
    _mm512_storeu_si512(xhi + c / 2, hi);
    _mm512_storeu_si512(xlo + c / 2, lo);
    const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, hi), k128, lo);
    _mm512_storeu_si512(corr + (c / kChunk) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), sum));
  }
}

// NB: blocks per 128-element chunk (1: blocks of >= 128 elements, 2: 64, 4: 32).
template <int NB>
float row_dot(const Weight4Q8& w, int64_t n, const int8_t* xlo, const int8_t* xhi, const int32_t* corr,
              const float* sxv, __m512i tab) {
  const int64_t K = w.K, bs = w.blocksize;
  // A division per chunk cost as much as the rest of the chunk: blocksizes are powers
  // of two in practice, so shift.
  const int sh = __builtin_ctzll(static_cast<uint64_t>(bs));
  const bool pow2 = (bs & (bs - 1)) == 0;
  const auto blk = [=](uint64_t i) { return pow2 ? (i >> sh) : i / static_cast<uint64_t>(bs); };
  // Lane j's block scale, for blocks smaller than a chunk: broadcasts (load-port work)
  // instead of a masked load and a permute, which cost ~15% of the whole call.
  const auto scales = [](const float* a) {
    __m512 v = _mm512_set1_ps(a[0]);
#pragma GCC unroll 4
    for (int t = 1; t < NB; ++t)
      v = _mm512_mask_mov_ps(v, static_cast<__mmask16>(0xffffu << (t * 16 / NB)), _mm512_set1_ps(a[t]));
    return v;
  };
  __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps();
  const uint8_t* row = w.packed + n * K / 2;
  const uint64_t i0 = static_cast<uint64_t>(n * K);
  // Unsigned offsets: signed ones cost a sign fix-up per division by 2 and by the chunk.
  uint64_t c = 0;
  const uint64_t Ku = static_cast<uint64_t>(K);
  // Two chunks per step with their loads and lookups interleaved by hand: the same code
  // written one chunk at a time (lambdas) measured 8% slower (GCC 12).
  for (; c + 2 * kChunk <= Ku; c += 2 * kChunk) {
    const __m512i raw0 = _mm512_loadu_si512(row + c / 2), raw1 = _mm512_loadu_si512(row + (c + kChunk) / 2);
    __m512i a0 = _mm512_loadu_si512(corr + (c / kChunk) * 16), a1 = _mm512_loadu_si512(corr + (c / kChunk + 1) * 16);
    a0 = _mm512_dpbusd_epi32(a0, _mm512_permutexvar_epi8(raw0, tab), _mm512_loadu_si512(xlo + c / 2));
    a1 = _mm512_dpbusd_epi32(a1, _mm512_permutexvar_epi8(raw1, tab), _mm512_loadu_si512(xlo + (c + kChunk) / 2));
    a0 = _mm512_dpbusd_epi32(a0, _mm512_permutexvar_epi8(_mm512_srli_epi16(raw0, 4), tab),
                             _mm512_loadu_si512(xhi + c / 2));
    a1 = _mm512_dpbusd_epi32(a1, _mm512_permutexvar_epi8(_mm512_srli_epi16(raw1, 4), tab),
                             _mm512_loadu_si512(xhi + (c + kChunk) / 2));
    __m512 s0, s1;
    if (NB > 1) {
      s0 = scales(w.absmax + blk(i0 + c));
      s1 = scales(w.absmax + blk(i0 + c + kChunk));
    } else {
      s0 = _mm512_set1_ps(w.absmax[blk(i0 + c)]);
      s1 = _mm512_set1_ps(w.absmax[blk(i0 + c + kChunk)]);
    }
    f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), _mm512_mul_ps(s0, _mm512_loadu_ps(sxv + (c / kChunk) * 16)), f0);
    f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), _mm512_mul_ps(s1, _mm512_loadu_ps(sxv + (c / kChunk + 1) * 16)), f1);
  }
  for (; c < Ku; c += kChunk) {
    const __m512i raw = _mm512_loadu_si512(row + c / 2);
    __m512i a = _mm512_loadu_si512(corr + (c / kChunk) * 16);
    a = _mm512_dpbusd_epi32(a, _mm512_permutexvar_epi8(raw, tab), _mm512_loadu_si512(xlo + c / 2));
    a = _mm512_dpbusd_epi32(a, _mm512_permutexvar_epi8(_mm512_srli_epi16(raw, 4), tab),
                            _mm512_loadu_si512(xhi + c / 2));
    const __m512 s = NB > 1 ? scales(w.absmax + blk(i0 + c))
                             : _mm512_set1_ps(w.absmax[blk(i0 + c)]);
    f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(s, _mm512_loadu_ps(sxv + (c / kChunk) * 16)), f0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(f0, f1));
}

// Quantized rows of x, each in prepare_row's layout, at fixed strides.
struct XRows {
  int8_t *lo, *hi;  // K / 2 bytes per row
  int32_t* corr;    // 16 per chunk per row
  float* sxv;       // 16 per chunk per row
  int64_t K;
  int8_t* lo_of(int64_t m) const { return lo + m * (K / 2); }
  int8_t* hi_of(int64_t m) const { return hi + m * (K / 2); }
  int32_t* corr_of(int64_t m) const { return corr + m * (K / kChunk) * 16; }
  float* sxv_of(int64_t m) const { return sxv + m * (K / kChunk) * 16; }
};

// Several rows of x: out[r] = sum over chunks [c0, c1) of weight row n . row m0 + r of x.
// Each chunk of W is looked up once for all R rows (the lookups and the block scale are
// half the work of the one-row loop).
template <int NB, int R>
void rows_x_dot(const Weight4Q8& w, int64_t n, const XRows& xs, int64_t m0, int64_t c0, int64_t c1, __m512i tab,
                float* out) {
  const int64_t K = w.K, bs = w.blocksize;
  const int sh = __builtin_ctzll(static_cast<uint64_t>(bs));
  const bool pow2 = (bs & (bs - 1)) == 0;
  const auto blk = [=](int64_t i) { return pow2 ? (i >> sh) : i / bs; };
  const uint8_t* row = w.packed + n * K / 2;
  const int64_t i0 = n * K;
  __m512 f[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) f[r] = _mm512_setzero_ps();
  for (int64_t c = c0; c < c1; c += kChunk) {
    const __m512i raw = _mm512_loadu_si512(row + c / 2);
    const __m512i lo = _mm512_permutexvar_epi8(raw, tab);
    const __m512i hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(raw, 4), tab);
    const float* a = w.absmax + blk(i0 + c);
    __m512 s = _mm512_set1_ps(a[0]);
#pragma GCC unroll 4
    for (int t = 1; t < NB; ++t)
      s = _mm512_mask_mov_ps(s, static_cast<__mmask16>(0xffffu << (t * 16 / NB)), _mm512_set1_ps(a[t]));
    const int64_t q = (c / kChunk) * 16;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      __m512i acc =
          _mm512_dpbusd_epi32(_mm512_loadu_si512(xs.corr_of(m) + q), lo, _mm512_loadu_si512(xs.lo_of(m) + c / 2));
      acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512(xs.hi_of(m) + c / 2));
      f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(s, _mm512_loadu_ps(xs.sxv_of(m) + q)), f[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(f[r]);
}

template <int NB>
void rows_x_dot_any(int rows, const Weight4Q8& w, int64_t n, const XRows& xs, int64_t m0, int64_t c0, int64_t c1,
                    __m512i tab, float* out) {
  while (rows > 0) {
    const int r = rows >= 4 ? 4 : rows >= 2 ? 2 : 1;
    switch (r) {
      case 4: rows_x_dot<NB, 4>(w, n, xs, m0, c0, c1, tab, out); break;
      case 2: rows_x_dot<NB, 2>(w, n, xs, m0, c0, c1, tab, out); break;
      default: rows_x_dot<NB, 1>(w, n, xs, m0, c0, c1, tab, out); break;
    }
    rows -= r;
    m0 += r;
    out += r;
  }
}

// Many rows of x: tiles of kTileRows rows are quantized together; every thread takes a
// range of weight rows in blocks of kBlockN (~kBlockN * K / 2 bytes: L2-resident while
// all groups of the tile pass over it) and runs each weight row against groups of
// kGroupRows rows of x (their quantized rows, ~8 KiB each for K = 4096, stay in L1).
// Groups of 4 rows beat groups of 8 and K slices that keep 16-row groups in L1 (the
// sweep is in docs/design.md, "Numerics").
constexpr int64_t kTileRows = 64, kGroupRows = 4, kBlockN = 256;

void forward_many_rows(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias, float* y,
                       int64_t ldy, int nthreads, __m512i tab) {
  const int64_t N = w.N, K = w.K, bs = w.blocksize, nch = K / kChunk;
  ScratchMeter meter;
  const int64_t mt_max = imin(kTileRows, M);
  // Per row: K bytes of xlo/xhi (K / 4 floats), 32 lanes per chunk of corr and sxv.
  ScratchBuf buf(meter, mt_max * (K / 4 + 32 * nch));
  int8_t* bytes = reinterpret_cast<int8_t*>(buf.data());
  const XRows xs{bytes, bytes + mt_max * (K / 2), reinterpret_cast<int32_t*>(buf.data() + mt_max * (K / 4)),
                 buf.data() + mt_max * (K / 4 + 16 * nch), K};
  const int T = threads_for(ceil_div(N, 16), nthreads);
  for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
    const int64_t mt = imin(kTileRows, M - m0);
#pragma omp parallel for num_threads(threads_for(mt, nthreads)) schedule(static)
    for (int64_t r = 0; r < mt; ++r)
      prepare_row(x + (m0 + r) * ldx, K, bs, xs.lo_of(r), xs.hi_of(r), xs.corr_of(r), xs.sxv_of(r));
    // per column range, not per thread id: OpenMP may run fewer threads than asked (linear4_gemm.h)
#pragma omp parallel for schedule(static, 1) num_threads(T)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t nb = N * t / T, ne = N * (t + 1) / T;
      float d[kGroupRows];
      for (int64_t n0 = nb; n0 < ne; n0 += kBlockN) {
        for (int64_t g = 0; g < mt; g += kGroupRows) {
          const int rows = static_cast<int>(imin(kGroupRows, mt - g));
          for (int64_t n = n0; n < imin(ne, n0 + kBlockN); ++n) {
            if (bs == 32)
              rows_x_dot_any<4>(rows, w, n, xs, g, 0, K, tab, d);
            else if (bs == 64)
              rows_x_dot_any<2>(rows, w, n, xs, g, 0, K, tab, d);
            else
              rows_x_dot_any<1>(rows, w, n, xs, g, 0, K, tab, d);
            for (int r = 0; r < rows; ++r) y[(m0 + g + r) * ldy + n] = bias ? bias[n] + d[r] : d[r];
          }
        }
      }
    }
  }
}

// One row of the repacked weight (linear4_q8.h) against x in the same byte order: a panel
// is bs / 8 vectors whose int32 lanes each stay in one block, so the panel's 16 block
// scales (absmax * sx, one product per block) meet one converted vector. Four integer
// accumulators keep the vpdpbusd chains short enough to overlap.
float row_dot_repacked(const uint8_t* row, const float* absmax, int64_t nb, int64_t V, const int8_t* xlo,
                       const int8_t* xhi, const int32_t* corr, const float* sx, __m512i tab) {
  __m512 f = _mm512_setzero_ps();
  const uint64_t panels = static_cast<uint64_t>(ceil_div(nb, kQ8PanelBlocks)), step = static_cast<uint64_t>(V) * 64;
  for (uint64_t p = 0; p < panels; ++p) {
    __m512i a0 = _mm512_loadu_si512(corr + p * kQ8PanelBlocks), a1 = _mm512_setzero_si512();
    __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
    const uint8_t* r = row + p * step;
    const int8_t *l = xlo + p * step, *h = xhi + p * step;
    for (uint64_t o = 0; o < step; o += 128) {
      __m512i r0 = _mm512_loadu_si512(r + o), r1 = _mm512_loadu_si512(r + o + 64);
      // Keeps the weight bytes in registers: GCC 12 otherwise folds a second load of them
      // into the shift, and loads are what this loop is short of.
      asm("" : "+v"(r0), "+v"(r1));
      a0 = _mm512_dpbusd_epi32(a0, _mm512_permutexvar_epi8(r0, tab), _mm512_loadu_si512(l + o));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_permutexvar_epi8(_mm512_srli_epi16(r0, 4), tab), _mm512_loadu_si512(h + o));
      a2 = _mm512_dpbusd_epi32(a2, _mm512_permutexvar_epi8(r1, tab), _mm512_loadu_si512(l + o + 64));
      a3 = _mm512_dpbusd_epi32(a3, _mm512_permutexvar_epi8(_mm512_srli_epi16(r1, 4), tab),
                               _mm512_loadu_si512(h + o + 64));
    }
    const __m512i a = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
    // The last panel of a row may hold fewer than 16 blocks: a masked load keeps absmax
    // reads inside the row (the padded lanes have xq = 0 and sx = 0).
    const int64_t left = nb - static_cast<int64_t>(p) * kQ8PanelBlocks;
    const __mmask16 m = left >= kQ8PanelBlocks ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, absmax + p * kQ8PanelBlocks),
                                   _mm512_loadu_ps(sx + p * kQ8PanelBlocks));
    f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, f);
  }
  return _mm512_reduce_add_ps(f);
}

}  // namespace

void linear4_q8_forward_repacked_avx512vnni(const float* x, int64_t M, int64_t ldx, const uint8_t* repacked,
                                            const Weight4Q8& w, const float* bias, float* y, int64_t ldy,
                                            int nthreads) {
  const int64_t N = w.N, K = w.K, bs = w.blocksize, nch = K / kChunk, nb = K / bs, V = bs / 8;
  const int64_t panels = ceil_div(nb, kQ8PanelBlocks), row_bytes = panels * kQ8PanelBlocks * (bs / 2);
  alignas(64) uint8_t t8[64];
  for (int j = 0; j < 64; ++j) t8[j] = static_cast<uint8_t>(w.code8[j % 16] + 128);
  const __m512i tab = _mm512_load_si512(t8);
  ScratchMeter meter;
  // Natural order (prepare_row): xlo, xhi K / 2 bytes each, corr and sxv 16 per chunk;
  // repacked order: xlo, xhi row_bytes each, corr and sx 16 per panel.
  ScratchBuf buf(meter, K / 4 + 32 * nch + row_bytes / 2 + 32 * panels + 16);
  int8_t* nlo = reinterpret_cast<int8_t*>(buf.data());
  int8_t* nhi = nlo + K / 2;
  int32_t* ncorr = reinterpret_cast<int32_t*>(buf.data() + K / 4);
  float* nsxv = buf.data() + K / 4 + 16 * nch;
  int8_t* rlo = reinterpret_cast<int8_t*>(nsxv + 16 * nch);
  int8_t* rhi = rlo + row_bytes;
  int32_t* rcorr = reinterpret_cast<int32_t*>(rhi + row_bytes);
  float* rsx = reinterpret_cast<float*>(rcorr + panels * kQ8PanelBlocks);
  // read only by the OpenMP pragma below (the ONNX Runtime library builds without OpenMP)
  [[maybe_unused]] const int T = threads_for(ceil_div(N, 16), nthreads);
  for (int64_t m = 0; m < M; ++m) {
    prepare_row(x + m * ldx, K, bs, nlo, nhi, ncorr, nsxv);
    // x's bytes in the weight's repacked order (the same permutation: one row of K / 2
    // bytes each); per block, corr is the sum of its lanes and sx its group's scale.
    linear4_q8_repack(reinterpret_cast<const uint8_t*>(nlo), 1, K, bs, reinterpret_cast<uint8_t*>(rlo), 1);
    linear4_q8_repack(reinterpret_cast<const uint8_t*>(nhi), 1, K, bs, reinterpret_cast<uint8_t*>(rhi), 1);
    for (int64_t b = 0; b < panels * kQ8PanelBlocks; ++b) {
      int32_t c = 0;
      if (b < nb)
        for (int64_t l = b * (bs / 8); l < (b + 1) * (bs / 8); ++l) c += ncorr[l];
      rcorr[b] = c;
      rsx[b] = b < nb ? nsxv[b * (bs / 8)] : 0.f;
    }
    float* ym = y + m * ldy;
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float d = row_dot_repacked(repacked + n * row_bytes, w.absmax + n * nb, nb, V, rlo, rhi, rcorr, rsx, tab);
      ym[n] = bias ? d + bias[n] : d;
    }
  }
}

bool linear4_q8_avx512vnni_fits(const Weight4Q8& w) {
  const int64_t bs = w.blocksize;
  // Lanes of 8 elements never straddle a block or an x group; a chunk meets at most one
  // of either when blocks are >= a chunk (then K % 128 == 0 keeps both aligned).
  return w.K % kChunk == 0 && (bs % kChunk == 0 || bs == 32 || bs == 64);
}

void linear4_q8_forward_avx512vnni(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias,
                                   float* y, int64_t ldy, int nthreads) {
  const int64_t N = w.N, K = w.K, bs = w.blocksize, nch = K / kChunk;
  alignas(64) uint8_t t8[64];
  for (int j = 0; j < 64; ++j) t8[j] = static_cast<uint8_t>(w.code8[j % 16] + 128);
  const __m512i tab = _mm512_load_si512(t8);
  if (M > 1) return forward_many_rows(x, M, ldx, w, bias, y, ldy, nthreads, tab);
  ScratchMeter meter;
  // xlo, xhi: K bytes; corr, sxv: 16 lanes per chunk (in floats: K/2 + 32 * nch).
  ScratchBuf buf(meter, K / 2 + 32 * nch + 16);
  int8_t* xlo = reinterpret_cast<int8_t*>(buf.data());
  int8_t* xhi = xlo + K / 2;
  int32_t* corr = reinterpret_cast<int32_t*>(buf.data() + K / 2);
  float* sxv = buf.data() + K / 2 + 16 * nch;
  prepare_row(x, K, bs, xlo, xhi, corr, sxv);
#pragma omp parallel for num_threads(threads_for(ceil_div(N, 16), nthreads)) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float d = bs == 32   ? row_dot<4>(w, n, xlo, xhi, corr, sxv, tab)
                    : bs == 64 ? row_dot<2>(w, n, xlo, xhi, corr, sxv, tab)
                               : row_dot<1>(w, n, xlo, xhi, corr, sxv, tab);
    y[n] = bias ? d + bias[n] : d;
  }
}

}  // namespace qk
