// Few-row paths of the fused 4-bit linear layer (ISA-flagged files only). Each packed
// row is streamed once and decoded in registers with the dword-order decoder of
// linear4_simd.h; since that decoder yields a fixed permutation of each chunk, the
// forward path permutes x once per call instead of un-permuting every decoded vector,
// and the input-gradient path un-permutes its accumulators once per chunk.
//
// Every loop over a register array (accumulators) carries "#pragma GCC unroll": under
// -fopenmp, GCC otherwise turned the zeroing loop into a memset, which pinned the
// accumulators to the stack and halved the speed of the inner loops.
//
// The block scale is folded into the 16-entry codebook once per block (2 or 1 vector
// multiplies for the whole block) when blocks cover whole chunks, so the decoded values
// are Wd itself at no per-element cost; smaller blocks (32, 64 < chunk) multiply by a
// per-lane scale vector instead.
#pragma once
#include "linear4_simd.h"

namespace qk {
namespace {

template <int S>
struct IC {
  static constexpr int value = S;
};
template <class F>
inline void for8(F&& f) {
  f(IC<0>{}); f(IC<1>{}); f(IC<2>{}); f(IC<3>{});
  f(IC<4>{}); f(IC<5>{}); f(IC<6>{}); f(IC<7>{});
}

// 256-bit policy: 64-element chunks (32 packed bytes), 8 lanes.
struct Y8 {
  using V = __m256;
  using Raw = __m256i;
  static constexpr int L = 8, C = 64;
  struct Tab {
    __m256 lo, hi;
  };
  Tab base;
  __m256i lane_blk;  // block offset of lane j within a chunk (blocksize < C)
  __m256i first;     // lanes that select a valid absmax entry in lane_scale
  explicit Y8(const Weight4& w) : base{_mm256_loadu_ps(w.code), _mm256_loadu_ps(w.code + 8)} {
    alignas(32) int32_t lb[8], f[8];
    const int64_t nb = w.blocksize < C ? C / w.blocksize : 1;
    for (int j = 0; j < 8; ++j) {
      lb[j] = static_cast<int32_t>(w.blocksize < C ? (8 * j) / w.blocksize : 0);
      f[j] = j < nb ? -1 : 0;
    }
    lane_blk = _mm256_load_si256(reinterpret_cast<const __m256i*>(lb));
    first = _mm256_load_si256(reinterpret_cast<const __m256i*>(f));
  }
  static Tab scale(const Tab& t, float a) {
    const __m256 s = _mm256_set1_ps(a);
    return {_mm256_mul_ps(t.lo, s), _mm256_mul_ps(t.hi, s)};
  }
  static Raw raw(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  template <int S>
  static V nib(Raw r, const Tab& t) { return qk::nib<S>(r, t.lo, t.hi); }
  // Masked load: never touches absmax entries past the chunk's last block.
  V lane_scale(const float* a) const { return _mm256_permutevar8x32_ps(_mm256_maskload_ps(a, first), lane_blk); }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) { return hsum(v); }
};

#if defined(__AVX512F__)
// 512-bit policy: 128-element chunks (64 packed bytes), 16 lanes; one vpermps is a
// whole 16-entry lookup.
struct Z16 {
  using V = __m512;
  using Raw = __m512i;
  static constexpr int L = 16, C = 128;
  struct Tab {
    __m512 t;
  };
  Tab base;
  __m512i lane_blk;
  __mmask16 first;
  explicit Z16(const Weight4& w) : base{_mm512_loadu_ps(w.code)} {
    alignas(64) int32_t lb[16];
    const int64_t nb = w.blocksize < C ? C / w.blocksize : 1;
    for (int j = 0; j < 16; ++j) lb[j] = static_cast<int32_t>(w.blocksize < C ? (8 * j) / w.blocksize : 0);
    lane_blk = _mm512_load_si512(lb);
    first = static_cast<__mmask16>((1u << nb) - 1);
  }
  static Tab scale(const Tab& t, float a) { return {_mm512_mul_ps(t.t, _mm512_set1_ps(a))}; }
  static Raw raw(const uint8_t* p) { return _mm512_loadu_si512(p); }
  template <int S>
  static V nib(Raw r, const Tab& t) {
    return _mm512_permutexvar_ps(S == 0 ? r : _mm512_srli_epi32(r, 4 * S), t.t);
  }
  V lane_scale(const float* a) const { return _mm512_permutexvar_ps(lane_blk, _mm512_maskz_loadu_ps(first, a)); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#endif

// Whether policy P's chunks fit this weight (the caller falls back otherwise).
template <class P>
bool gemv_fits(const Weight4& w) {
  return dword_chunks_ok(w, P::C);
}

// xp[m][c*C + s*L + j] = x[m][c*C + 8j + (s^1)]: x in the order the decoder produces W.
template <class P>
void permute_x(const float* x, int64_t M, int64_t ldx, int64_t K, float* xp) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += P::C)
      for (int s = 0; s < 8; ++s)
        for (int j = 0; j < P::L; ++j) xp[m * K + c + s * P::L + j] = x[m * ldx + c + 8 * j + (s ^ 1)];
}

// out[m] = sum_k xp[m][k] * Wd[n, k] for MB rows of x. U: blocks cover whole chunks.
template <class P, int MB, bool U>
void gemv_row(const P& p, const float* xp, const Weight4& w, const BlockIndex& bi, int64_t n, float* out) {
  using V = typename P::V;
  constexpr int PA = MB == 1 ? 4 : 2;  // independent FMA chains per row of x
  const int64_t K = w.K;
  V acc[MB][PA];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int a = 0; a < PA; ++a) acc[m][a] = P::zero();
  typename P::Tab tab = p.base;
  int64_t cur = -1;
  for (int64_t c = 0; c < K; c += P::C) {
    const uint64_t i = static_cast<uint64_t>(n * K + c);  // unsigned: i / 2 without a sign fix-up
    const typename P::Raw raw = P::raw(w.packed + i / 2);
    V sv = P::zero();
    if (U) {
      const int64_t b = bi(i);
      if (b != cur) tab = P::scale(p.base, w.absmax[cur = b]);
    } else {
      sv = p.lane_scale(w.absmax + bi(i));
    }
    if (U) {
      for8([&](auto s) {
        constexpr int S = decltype(s)::value;
        const V v = P::template nib<S>(raw, tab);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc[m][S % PA] = P::fma(v, P::load(xp + m * K + c + S * P::L), acc[m][S % PA]);
      });
    } else {
      // Blocks smaller than the chunk: lane j's eight products share one block, so they
      // are summed unscaled and scaled once (one multiply per lane group instead of one
      // per decoded vector; the rounding stays within the fp32 dot-product bound).
      V part[MB][2];
      for8([&](auto s) {
        constexpr int S = decltype(s)::value;
        const V v = P::template nib<S>(raw, tab);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const V xv = P::load(xp + m * K + c + S * P::L);
          part[m][S % 2] = S < 2 ? P::mul(v, xv) : P::fma(v, xv, part[m][S % 2]);
        }
      });
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        acc[m][0] = P::fma(part[m][0], sv, acc[m][0]);
        acc[m][1] = P::fma(part[m][1], sv, acc[m][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
    V t = acc[m][0];
    for (int a = 1; a < PA; ++a) t = P::add(t, acc[m][a]);
    out[m] = P::sum(t);
  }
}

// Runs gemv_row for a group of mb <= MB rows of x.
template <class P, int MB>
void gemv_rows(int mb, const P& p, const float* xp, const Weight4& w, const BlockIndex& bi, int64_t n, float* out) {
  if constexpr (MB > 1) {
    if (mb < MB) return gemv_rows<P, MB - 1>(mb, p, xp, w, bi, n, out);
  }
  if (w.blocksize % P::C == 0)
    gemv_row<P, MB, true>(p, xp, w, bi, n, out);
  else
    gemv_row<P, MB, false>(p, xp, w, bi, n, out);
}

// y = x Wd^T (+ bias) for few rows of x; threads split the output columns. x is put in the
// decoder's order once (permute), then rows(mb, xp, n, out) gives output column n for a
// group of mb <= MBMAX rows.
template <int MBMAX, class Permute, class Rows>
void gemv_forward_with(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias, float* y,
                       int64_t ldy, int nthreads, Permute permute, Rows rows) {
  static_assert(MBMAX >= 1 && MBMAX <= 8, "row groups of 1..8");
  const int64_t N = w.N, K = w.K;
  ScratchMeter meter;
  ScratchBuf xp(meter, M * K);
  permute(x, M, ldx, K, xp.data());
  const float* xpd = xp.data();
#pragma omp parallel for num_threads(threads_for(ceil_div(N, 16), nthreads)) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m0 = 0; m0 < M; m0 += MBMAX) {
      const int mb = static_cast<int>(imin(MBMAX, M - m0));
      float out[MBMAX];
      rows(mb, xpd + m0 * K, n, out);
      for (int m = 0; m < mb; ++m) y[(m0 + m) * ldy + n] = bias ? out[m] + bias[n] : out[m];
    }
  }
}

template <class P, int MBMAX>
void gemv_forward(const float* x, int64_t M, int64_t ldx, const Weight4& w, const float* bias, float* y,
                  int64_t ldy, int nthreads) {
  const P p(w);
  const BlockIndex bi(w.blocksize);
  gemv_forward_with<MBMAX>(x, M, ldx, w, bias, y, ldy, nthreads, permute_x<P>,
                           [&](int mb, const float* xp, int64_t n, float* out) {
                             gemv_rows<P, MBMAX>(mb, p, xp, w, bi, n, out);
                           });
}

constexpr int64_t kRowsAhead = 16;  // software prefetch distance of the transposed GEMV

// dx[m][c .. c+C) = sum_n dy[m][n] * Wd[n, c .. c+C): one chunk column, all rows of W.
template <class P, bool U>
void gemvT_chunk(const P& p, const float* dym, const Weight4& w, const BlockIndex& bi, int64_t c, float* dxm) {
  using V = typename P::V;
  V acc[8];
#pragma GCC unroll 8
  for (int s = 0; s < 8; ++s) acc[s] = P::zero();
  for (int64_t n = 0; n < w.N; ++n) {
    const int64_t i = n * w.K + c;
    // One chunk per row at a stride of K/2 bytes, down all of W: prefetch ahead.
    if (n + kRowsAhead < w.N) prefetch_span(w.packed + (i + kRowsAhead * w.K) / 2, P::C / 2);
    const typename P::Raw raw = P::raw(w.packed + i / 2);
    const typename P::Tab tab = U ? P::scale(p.base, w.absmax[bi(i)]) : p.base;
    const V sv = U ? P::zero() : p.lane_scale(w.absmax + bi(i));
    const V g = P::set1(dym[n]);
    for8([&](auto s) {
      constexpr int S = decltype(s)::value;
      V v = P::template nib<S>(raw, tab);
      if (!U) v = P::mul(v, sv);
      acc[S] = P::fma(v, g, acc[S]);
    });
  }
  alignas(64) float t[8 * P::L];
#pragma GCC unroll 8
  for (int s = 0; s < 8; ++s) P::store(t + s * P::L, acc[s]);
  for (int s = 0; s < 8; ++s)
    for (int j = 0; j < P::L; ++j) dxm[c + 8 * j + (s ^ 1)] = t[s * P::L + j];
}

// As gemvT_chunk for mb rows of dy at once: the chunk is decoded once per row of W and
// applied to every row of dy; the mb x C accumulators live in acc (L1-resident).
template <class P, bool U>
void gemvT_chunk_rows(const P& p, const float* dy, int64_t lddy, int64_t mb, const Weight4& w, const BlockIndex& bi,
                      int64_t c, float* acc, float* dx, int64_t lddx) {
  using V = typename P::V;
  for (int64_t t = 0; t < mb * P::C; t += P::L) P::store(acc + t, P::zero());
  for (int64_t n = 0; n < w.N; ++n) {
    const int64_t i = n * w.K + c;
    if (n + kRowsAhead < w.N) prefetch_span(w.packed + (i + kRowsAhead * w.K) / 2, P::C / 2);
    const typename P::Raw raw = P::raw(w.packed + i / 2);
    const typename P::Tab tab = U ? P::scale(p.base, w.absmax[bi(i)]) : p.base;
    const V sv = U ? P::zero() : p.lane_scale(w.absmax + bi(i));
    V v[8];
    for8([&](auto s) {
      constexpr int S = decltype(s)::value;
      v[S] = P::template nib<S>(raw, tab);
      if (!U) v[S] = P::mul(v[S], sv);
    });
    for (int64_t m = 0; m < mb; ++m) {
      const V g = P::set1(dy[m * lddy + n]);
      float* a = acc + m * P::C;
#pragma GCC unroll 8
      for (int s = 0; s < 8; ++s) P::store(a + s * P::L, P::fma(v[s], g, P::load(a + s * P::L)));
    }
  }
  for (int64_t m = 0; m < mb; ++m)
    for (int s = 0; s < 8; ++s)
      for (int j = 0; j < P::L; ++j) dx[m * lddx + c + 8 * j + (s ^ 1)] = acc[m * P::C + s * P::L + j];
}

// dx = dy Wd for few rows of dy; threads split the columns of dx (chunks of C). One or
// two rows keep their accumulators in registers (a pass each); more rows share each
// decoded chunk.
template <class P>
void gemv_backward(const float* dy, int64_t M, int64_t lddy, const Weight4& w, float* dx, int64_t lddx,
                   int nthreads) {
  constexpr int64_t kRows = 16;  // rows of dy per pass over W (16 x C floats of accumulators)
  const P p(w);
  const BlockIndex bi(w.blocksize);
  const int64_t nchunks = w.K / P::C;
  const bool U = w.blocksize % P::C == 0;
  const int T = threads_for(nchunks, nthreads);
  ScratchMeter meter;
  ScratchBuf accs(meter, M > 2 ? T * kRows * P::C : 0);
#pragma omp parallel num_threads(T)
  {
    float* acc = accs.data() + thread_id() * kRows * P::C;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < nchunks; ++q) {
      const int64_t c = q * P::C;
      if (M <= 2) {  // two register passes beat one pass through L1 accumulators
        for (int64_t m = 0; m < M; ++m) {
          if (U)
            gemvT_chunk<P, true>(p, dy + m * lddy, w, bi, c, dx + m * lddx);
          else
            gemvT_chunk<P, false>(p, dy + m * lddy, w, bi, c, dx + m * lddx);
        }
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t mb = imin(kRows, M - m0);
        if (U)
          gemvT_chunk_rows<P, true>(p, dy + m0 * lddy, lddy, mb, w, bi, c, acc, dx + m0 * lddx, lddx);
        else
          gemvT_chunk_rows<P, false>(p, dy + m0 * lddy, lddy, mb, w, bi, c, acc, dx + m0 * lddx, lddx);
      }
    }
  }
}

}  // namespace
}  // namespace qk
