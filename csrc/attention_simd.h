// The block products and softmax row passes of attention.h, written once for any vector
// width V (vec_scalar.h, vec_avx2.h, vec_avx512.h). Register tiles of 4 rows x 2 vectors:
// per step 2 loads and 4 broadcasts feed 8 FMAs, so the loops are FMA-bound at head sizes
// of 64-128, where a dot-product formulation would end every output in a horizontal sum.
// Internal linkage, as in norm_act_simd.h.
#pragma once
#include <algorithm>

#include "attention.h"
#include "norm_act_simd.h"  // exp_simd: the exp every SwiGLU path uses

namespace qk {
namespace {

namespace attn {

// The last key (exclusive) rows [i, i + R) of a causal block can see.
inline int64_t causal_end(int64_t causal0, int64_t i, int R, int64_t nc) {
  return causal0 < 0 ? nc : std::min(nc, causal0 + i + R);
}

template <class V, int R, int NV>
void scores_tile(const float* X, int64_t ldx, const float* Yt, int64_t ldy, int64_t D, float alpha, float* C,
                 int64_t ldc, int64_t i, int64_t j) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  Reg acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::set1(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    Reg y[NV];
    for (int v = 0; v < NV; ++v) y[v] = V::load(Yt + d * ldy + j + v * L);
    for (int r = 0; r < R; ++r) {
      const Reg x = V::set1(X[(i + r) * ldx + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(x, y[v], acc[r][v]);
    }
  }
  const Reg a = V::set1(alpha);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) V::store(C + (i + r) * ldc + j + v * L, V::mul(acc[r][v], a));
}

template <class V, int R>
void scores_rows(const float* X, int64_t ldx, const float* Yt, int64_t ldy, int64_t nc, int64_t D, float alpha,
                 float* C, int64_t ldc, int64_t i) {
  constexpr int L = V::kLanes;
  int64_t j = 0;
  for (; j + 2 * L <= nc; j += 2 * L) scores_tile<V, R, 2>(X, ldx, Yt, ldy, D, alpha, C, ldc, i, j);
  for (; j + L <= nc; j += L) scores_tile<V, R, 1>(X, ldx, Yt, ldy, D, alpha, C, ldc, i, j);
  if (j < nc) {  // a whole vector of columns (Yt is padded), the valid ones kept
    float tail[R * L];
    scores_tile<V, R, 1>(X + i * ldx, ldx, Yt + j, ldy, D, alpha, tail, L, 0, 0);
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < nc - j; ++c) C[(i + r) * ldc + j + c] = tail[r * L + c];
  }
}

template <class V>
void rows_by_cols(const float* X, int64_t ldx, const float* Yt, int64_t ldy, int64_t nr, int64_t nc, int64_t D,
                  float alpha, float* C, int64_t ldc, int64_t causal0) {
  int64_t i = 0;
  for (; i + 4 <= nr; i += 4)
    scores_rows<V, 4>(X, ldx, Yt, ldy, causal_end(causal0, i, 4, nc), D, alpha, C, ldc, i);
  for (; i < nr; ++i) scores_rows<V, 1>(X, ldx, Yt, ldy, causal_end(causal0, i, 1, nc), D, alpha, C, ldc, i);
}

// C rows [i, i + R), columns [e, e + NV*L): (C if acc) + alpha * scale[i] * sum over j < jend of P[., j] * Y[j, .]
template <class V, int R, int NV>
void mix_tile(const float* P, int64_t ldp, const float* Y, int64_t ldy, int64_t jend, const Mix& m, float* C,
              int64_t ldc, int64_t i, int64_t e) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  Reg acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::set1(0.0f);
  for (int64_t j = 0; j < jend; ++j) {
    Reg y[NV];
    for (int v = 0; v < NV; ++v) y[v] = V::load(Y + j * ldy + e + v * L);
    for (int r = 0; r < R; ++r) {
      const Reg p = V::set1(P[(i + r) * ldp + j]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(p, y[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const Reg s = V::set1(m.factor(i + r));
    for (int v = 0; v < NV; ++v) {
      float* c = C + (i + r) * ldc + e + v * L;
      const Reg val = V::mul(acc[r][v], s);
      V::store(c, m.accumulate ? V::add(V::load(c), val) : val);
    }
  }
}

template <class V, int R>
void mix_rows(const float* P, int64_t ldp, const float* Y, int64_t ldy, int64_t jend, int64_t D, const Mix& m,
              float* C, int64_t ldc, int64_t i) {
  constexpr int L = V::kLanes;
  int64_t e = 0;
  for (; e + 2 * L <= D; e += 2 * L) mix_tile<V, R, 2>(P, ldp, Y, ldy, jend, m, C, ldc, i, e);
  for (; e + L <= D; e += L) mix_tile<V, R, 1>(P, ldp, Y, ldy, jend, m, C, ldc, i, e);
  for (; e < D; ++e)
    for (int r = 0; r < R; ++r) {
      float s = 0.0f;
      for (int64_t j = 0; j < jend; ++j) s += P[(i + r) * ldp + j] * Y[j * ldy + e];
      float& c = C[(i + r) * ldc + e];
      c = m.accumulate ? c + s * m.factor(i + r) : s * m.factor(i + r);
    }
}

template <class V>
void rows_by_rows(const float* P, int64_t ldp, const float* Y, int64_t ldy, int64_t nr, int64_t nc, int64_t D,
                  const Mix& m, float* C, int64_t ldc, int64_t causal0) {
  int64_t i = 0;
  for (; i + 4 <= nr; i += 4) mix_rows<V, 4>(P, ldp, Y, ldy, causal_end(causal0, i, 4, nc), D, m, C, ldc, i);
  for (; i < nr; ++i) mix_rows<V, 1>(P, ldp, Y, ldy, causal_end(causal0, i, 1, nc), D, m, C, ldc, i);
}

// C rows [j, j + R), columns [e, e + NV*L) += sum over rows i in [ibeg, nr) of P[i, j + .] * Y[i, .]
template <class V, int R, int NV>
void acc_tile(const float* P, int64_t ldp, const float* Y, int64_t ldy, int64_t ibeg, int64_t nr, float* C,
              int64_t ldc, int64_t j, int64_t e) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  Reg acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::load(C + (j + r) * ldc + e + v * L);
  for (int64_t i = ibeg; i < nr; ++i) {
    Reg y[NV];
    for (int v = 0; v < NV; ++v) y[v] = V::load(Y + i * ldy + e + v * L);
    for (int r = 0; r < R; ++r) {
      const Reg p = V::set1(P[i * ldp + j + r]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(p, y[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) V::store(C + (j + r) * ldc + e + v * L, acc[r][v]);
}

template <class V, int R>
void acc_rows(const float* P, int64_t ldp, const float* Y, int64_t ldy, int64_t ibeg, int64_t nr, int64_t D, float* C,
              int64_t ldc, int64_t j) {
  constexpr int L = V::kLanes;
  int64_t e = 0;
  for (; e + 2 * L <= D; e += 2 * L) acc_tile<V, R, 2>(P, ldp, Y, ldy, ibeg, nr, C, ldc, j, e);
  for (; e + L <= D; e += L) acc_tile<V, R, 1>(P, ldp, Y, ldy, ibeg, nr, C, ldc, j, e);
  for (; e < D; ++e)
    for (int r = 0; r < R; ++r) {
      float s = C[(j + r) * ldc + e];
      for (int64_t i = ibeg; i < nr; ++i) s += P[i * ldp + j + r] * Y[i * ldy + e];
      C[(j + r) * ldc + e] = s;
    }
}

template <class V>
void cols_by_rows_acc(const float* P, int64_t ldp, const float* Y, int64_t ldy, int64_t nr, int64_t nc, int64_t D,
                      float* C, int64_t ldc, int64_t causal0) {
  // key j is first seen by block row j - causal0; the rows before see only zeros there
  const auto first = [&](int64_t j) { return causal0 < 0 ? int64_t(0) : std::min(nr, std::max<int64_t>(0, j - causal0)); };
  int64_t j = 0;
  for (; j + 4 <= nc; j += 4) acc_rows<V, 4>(P, ldp, Y, ldy, first(j), nr, D, C, ldc, j);
  for (; j < nc; ++j) acc_rows<V, 1>(P, ldp, Y, ldy, first(j), nr, D, C, ldc, j);
}

template <class V>
void softmax_grad(const float* p, float* ds, int64_t n, float delta, float scale) {
  constexpr int L = V::kLanes;
  const typename V::Reg dl = V::set1(delta), sc = V::set1(scale);
  int64_t j = 0;
  for (; j + L <= n; j += L) V::store(ds + j, V::mul(V::mul(V::load(p + j), V::sub(V::load(ds + j), dl)), sc));
  for (; j < n; ++j) ds[j] = p[j] * (ds[j] - delta) * scale;
}

template <class V>
float dot(const float* a, const float* b, int64_t n) {
  constexpr int L = V::kLanes;
  typename V::Reg acc = V::set1(0.0f);
  int64_t j = 0;
  for (; j + L <= n; j += L) acc = V::fmadd(V::load(a + j), V::load(b + j), acc);
  float s = V::hsum(acc);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

}  // namespace attn

template <class V>
AttnKernels attention_table() {
  return {attn::rows_by_cols<V>, attn::rows_by_rows<V>, attn::cols_by_rows_acc<V>, row_max<V>,
          exp_shift_sum<V>, attn::softmax_grad<V>, attn::dot<V>};
}

}  // namespace
}  // namespace qk
