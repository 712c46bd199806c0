// Many-row path of the fused 4-bit linear layer (ISA-flagged files only): a BLIS-style
// loop nest whose "B" operand is decoded from the packed weight panel by panel.
//
//   C[M, NO] (+)= A[M, KR] * B[KR, NO]
//   forward:  A = x,  B = Wd^T, C = y  (NO = N, KR = K)
//   backward: A = dy, B = Wd,   C = dx (NO = K, KR = N)
//
// Threads split the output columns (or, when there are too few, the rows), and each
// thread decodes its own KC x NC panels of B into an L2-resident buffer laid out as
// NR-wide micro-panels. Every element of W is decoded once per thread that needs it,
// and every decoded panel is reused by all rows of A before the next one is decoded:
// the decode cost is amortized over M. A is copied per MC x KC block into MR-row
// panels (k-major): read in place, MR rows at a large stride ran the AVX2 micro-kernel
// at half speed even from L1/L2; one sequential stream runs it at full speed.
#pragma once
#include "linear4_simd.h"
#include "tuning.h"

namespace qk {
namespace {

// A[0..mc, 0..kc) (row stride lda) into panels of MR rows: ap[(i/MR)*kc*MR + k*MR + i%MR].
// Rows past mc hold garbage (the micro-kernel for mr rows never reads them). Eight rows
// at a time are transposed in registers and stored as 8 floats at ap + k*MR + g: with
// MR not a multiple of 8 a store runs into the next k's slot, which the next store
// (same k loop, later in program order) overwrites; ap needs 16 floats of slack.
template <int MR>
void pack_a(const float* a, int64_t lda, int64_t mc, int64_t kc, float* ap) {
  constexpr int G = (MR + 7) / 8;
  const int64_t kv = kc & ~int64_t(7);
  for (int64_t ir = 0; ir < mc; ir += MR, ap += kc * MR) {
    const int64_t mr = imin(MR, mc - ir);
    const float* rows[G * 8];
    for (int r = 0; r < G * 8; ++r) rows[r] = a + (ir + (r < mr ? r : 0)) * lda;
    for (int64_t k = 0; k < kv; k += 8) {
      __m256 v[G][8];
      for (int g = 0; g < G; ++g) {
        for (int r = 0; r < 8; ++r) v[g][r] = _mm256_loadu_ps(rows[g * 8 + r] + k);
        transpose8(v[g]);
      }
      for (int j = 0; j < 8; ++j)
        for (int g = 0; g < G; ++g) _mm256_storeu_ps(ap + (k + j) * MR + g * 8, v[g][j]);
    }
    for (int64_t k = kv; k < kc; ++k)
      for (int64_t r = 0; r < mr; ++r) ap[k * MR + r] = rows[r][k];
  }
}

// UK: MR, NR (micro-tile) and
//   run(mr, kc, ap, b, c, ldc, nr, bias, first): C tile (mr x nr) = [bias +] A B on the
//   first KC block (first), C += A B after; ap is a packed A panel (ap[k*MR + r]).
// pack(j0, nc, p0, kc, bp, tmp): fills the panel of output columns [j0, j0+nc) and
//   reduction indices [p0, p0+kc), micro-panel q at bp + q * panel_stride(kc, NR);
//   tmp holds round_up(kc, 16) floats.
// bl: the cache blocking (tuning.h): kc and nc multiples of 64, mc rounded up to MR here.
// unit: the column granularity of the thread and NC splits (a multiple of NR): 32 for the
//   4-bit backward, whose panel decoder keeps its fast path on 32-aligned column offsets
//   (576 columns split 288/288 over two threads; in units of 64 only 320/256, which lost
//   to a row split that decodes every panel on both threads), NR otherwise.
// pack_rows: what filling one panel costs, in rows of micro-kernel work on it; weighs
//   splitting the columns (each thread fills its own panels but copies all of A) against
//   splitting the rows (each thread copies its rows of A but fills every panel).
template <class UK, class Pack>
void gemm_driver(int64_t M, int64_t NO, int64_t KR, const float* a, int64_t lda, float* c, int64_t ldc,
                 const float* bias, const Pack& pack, const Blocking& bl, int64_t unit, int64_t pack_rows,
                 int nthreads) {
  if (M == 0 || NO == 0) return;
  if (KR == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < NO; ++n) c[m * ldc + n] = bias ? bias[n] : 0.f;
    return;
  }
  constexpr int MR = UK::MR, NR = UK::NR;
  if (unit < NR || unit % NR != 0) unit = 64;
  // Equal reduction blocks, multiples of 64 and at most kc: K=576 as 256+256+64 ran the last
  // block's micro-kernel calls (C loaded and stored for 64 k) at a fraction of the rate.
  const int64_t nkb = ceil_div(KR, bl.kc);
  const int64_t KC = imin(bl.kc, round_up(ceil_div(KR, nkb), 64));
  const int64_t NC = round_up(bl.nc, unit), MC = round_up(bl.mc, MR);
  const int64_t units = ceil_div(NO, unit);
  const int64_t mu = ceil_div(M, MR);
  const int T0 = nthreads < 1 ? 1 : nthreads;
  // Every thread copies the rows of A it computes into panels: about this many columns of
  // micro-kernel work per row.
  constexpr int64_t kPackACols = 16;
  // The thread grid tn x tm with the least work on its busiest thread (ties: more column
  // groups, the old choice, which packs each panel once).
  int tn = 1, tm = 1;
  int64_t best = -1;
  for (int n = static_cast<int>(imin(T0, units)); n >= 1; --n) {
    const int m = static_cast<int>(imax(1, imin(T0 / n, mu)));
    const int64_t cols = ceil_div(units, n) * unit, rows = ceil_div(mu, m) * MR;
    const int64_t cost = cols * (rows + pack_rows) + rows * kPackACols;
    if (best < 0 || cost < best) best = cost, tn = n, tm = m;
  }
  const int T = tn * tm;
  const int64_t kcmax = imin(KC, KR);
  const int64_t ncmax = imin(NC, ceil_div(units, tn) * unit);
  const int64_t mcmax = round_up(imin(MC, M), MR);
  const int64_t bp_floats = ceil_div(ncmax, NR) * panel_stride(kcmax, NR);
  const int64_t per_thread = bp_floats + round_up(kcmax, 16) + round_up(mcmax * kcmax + 16, 16);
  ScratchMeter meter;
  ScratchBuf buf(meter, T * per_thread);
  // One iteration per grid cell, not one per thread id: OpenMP may run fewer threads than
  // asked (OMP_DYNAMIC on a busy machine, OMP_THREAD_LIMIT, a nested region), and a cell
  // keyed on omp_get_thread_num() would then never be computed. The cells and so the
  // results' bits stay those of the T-thread grid, however many threads run them.
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    const int ti = t % tn, tj = t / tn;
    const int64_t n0 = imin(NO, units * ti / tn * unit), n1 = imin(NO, units * (ti + 1) / tn * unit);
    const int64_t m0 = imin(M, mu * tj / tm * MR), m1 = imin(M, mu * (tj + 1) / tm * MR);
    float* bp = buf.data() + t * per_thread;
    float* tmp = bp + bp_floats;
    float* ap = tmp + round_up(kcmax, 16);
    for (int64_t jc = n0; jc < n1; jc += NC) {
      const int64_t nc = imin(NC, n1 - jc);
      for (int64_t pc = 0; pc < KR; pc += KC) {
        const int64_t kc = imin(KC, KR - pc);
        pack(jc, nc, pc, kc, bp, tmp);
        for (int64_t ic = m0; ic < m1; ic += MC) {
          const int64_t mc = imin(MC, m1 - ic);
          pack_a<MR>(a + ic * lda + pc, lda, mc, kc, ap);
          for (int64_t jr = 0; jr < nc; jr += NR) {
            const int nr = static_cast<int>(imin(NR, nc - jr));
            const float* bq = bp + (jr / NR) * panel_stride(kc, NR);
            const float* bb = bias ? bias + jc + jr : nullptr;
            for (int64_t ir = 0; ir < mc; ir += MR) {
              const int mr = static_cast<int>(imin(MR, mc - ir));
              UK::run(mr, kc, ap + ir * kc, bq, c + (ic + ir) * ldc + jc + jr, ldc, nr, bb, pc == 0);
            }
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace qk
