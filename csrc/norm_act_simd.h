// The vector loops of the fused RMSNorm / SwiGLU and their exp, written once for any SIMD
// width. Each ISA file supplies a traits struct V (register type, intrinsics, horizontal
// sum, 2^n from an integral float) and instantiates norm_act_table<V>(); tails go through
// norm_act_common.h. Every operation mirrors the scalar code, in the same order and
// without FMA, so a SwiGLU element has the same bits on every path (the RMSNorm sums
// differ by summation order only). Internal linkage, as in norm_act_common.h.
#pragma once
#include <algorithm>
#include <cmath>
#include "norm_act.h"
#include "norm_act_common.h"

namespace qk {
namespace {

template <class V>
typename V::Reg exp_simd(typename V::Reg x) {
  using namespace expc;
  using R = typename V::Reg;
  // max(lo, x) and min(hi, .) return their second operand when it is NaN: NaN passes
  x = V::min(V::set1(kHi), V::max(V::set1(kLo), x));
  const R n = V::sub(V::add(V::mul(x, V::set1(kLog2e)), V::set1(kRound)), V::set1(kRound));
  R r = V::sub(x, V::mul(n, V::set1(kLn2Hi)));
  r = V::sub(r, V::mul(n, V::set1(kLn2Lo)));
  R q = V::set1(kC[7]);
  for (int k = 6; k >= 2; --k) q = V::add(V::mul(q, r), V::set1(kC[k]));
  const R p = V::add(V::add(V::mul(V::mul(r, r), q), r), V::set1(1.0f));
  return V::scale_pow2(p, n);
}

template <class V>
void exp_range(const float* x, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + V::kLanes <= n; i += V::kLanes) V::store(y + i, exp_simd<V>(V::load(x + i)));
  for (; i < n; ++i) y[i] = exp_scalar(x[i]);
}

template <class V>
void rms_forward_row(const float* x, const float* w, int64_t K, float eps, float* y, float* rstd) {
  using R = typename V::Reg;
  constexpr int L = V::kLanes;
  // two accumulators: the adds of one would wait on each other's latency
  R a0 = V::set1(0.0f), a1 = V::set1(0.0f);
  int64_t i = 0;
  for (; i + 2 * L <= K; i += 2 * L) {
    const R v0 = V::load(x + i), v1 = V::load(x + i + L);
    a0 = V::add(a0, V::mul(v0, v0));
    a1 = V::add(a1, V::mul(v1, v1));
  }
  for (; i + L <= K; i += L) {
    const R v = V::load(x + i);
    a0 = V::add(a0, V::mul(v, v));
  }
  float ss = V::hsum(V::add(a0, a1));
  for (; i < K; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(K) + eps);
  *rstd = r;
  const R rv = V::set1(r);
  i = 0;
  for (; i + L <= K; i += L) V::store(y + i, V::mul(V::load(w + i), V::mul(V::load(x + i), rv)));
  for (; i < K; ++i) y[i] = w[i] * (x[i] * r);
}

template <class V>
void rms_backward_row(const float* dy, const float* x, const float* w, float r, int64_t K, float* dx,
                      float* dw_acc) {
  using R = typename V::Reg;
  constexpr int L = V::kLanes;
  R a0 = V::set1(0.0f), a1 = V::set1(0.0f);
  int64_t i = 0;
  for (; i + 2 * L <= K; i += 2 * L) {
    a0 = V::add(a0, V::mul(V::mul(V::load(dy + i), V::load(w + i)), V::load(x + i)));
    a1 = V::add(a1, V::mul(V::mul(V::load(dy + i + L), V::load(w + i + L)), V::load(x + i + L)));
  }
  for (; i + L <= K; i += L) a0 = V::add(a0, V::mul(V::mul(V::load(dy + i), V::load(w + i)), V::load(x + i)));
  float s = V::hsum(V::add(a0, a1));
  for (; i < K; ++i) s += dy[i] * w[i] * x[i];
  const float c = r * r * r / static_cast<float>(K) * s;
  const R rv = V::set1(r), cv = V::set1(c);
  i = 0;
  for (; i + L <= K; i += L) {
    const R d = V::load(dy + i), xv = V::load(x + i);
    V::store(dx + i, V::sub(V::mul(rv, V::mul(d, V::load(w + i))), V::mul(xv, cv)));
    if (dw_acc) V::store(dw_acc + i, V::add(V::load(dw_acc + i), V::mul(d, V::mul(xv, rv))));
  }
  for (; i < K; ++i) {
    dx[i] = r * (dy[i] * w[i]) - x[i] * c;
    if (dw_acc) dw_acc[i] += dy[i] * (x[i] * r);
  }
}

template <class V>
void swiglu_forward(const float* g, const float* u, int64_t n, float* h) {
  using R = typename V::Reg;
  const R one = V::set1(1.0f), zero = V::set1(0.0f);
  int64_t i = 0;
  for (; i + V::kLanes <= n; i += V::kLanes) {
    const R gv = V::load(g + i);
    const R silu = V::div(gv, V::add(one, exp_simd<V>(V::sub(zero, gv))));
    V::store(h + i, V::mul(silu, V::load(u + i)));
  }
  for (; i < n; ++i) swiglu_forward_elem(g[i], u[i], h[i]);
}

template <class V>
void swiglu_backward(const float* dh, const float* g, const float* u, int64_t n, float* dg, float* du) {
  using R = typename V::Reg;
  const R one = V::set1(1.0f), zero = V::set1(0.0f);
  int64_t i = 0;
  for (; i + V::kLanes <= n; i += V::kLanes) {
    const R gv = V::load(g + i), dv = V::load(dh + i);
    const R d1 = V::add(one, exp_simd<V>(V::sub(zero, gv)));
    const R s = V::div(one, d1);
    V::store(du + i, V::mul(dv, V::div(gv, d1)));
    const R t = V::add(one, V::mul(gv, V::sub(one, s)));
    V::store(dg + i, V::mul(V::mul(V::mul(dv, V::load(u + i)), s), t));
  }
  for (; i < n; ++i) swiglu_backward_elem(dh[i], g[i], u[i], dg[i], du[i]);
}

// The row passes of a softmax, shared with attention_simd.h: the row's max, and exp(s -
// shift) written over s with its sum (fixed order).
template <class V>
float row_max(const float* s, int64_t n) {
  constexpr int L = V::kLanes;
  float m = -INFINITY;
  int64_t j = 0;
  if (n >= L) {
    typename V::Reg a = V::load(s);
    for (j = L; j + L <= n; j += L) a = V::max(V::load(s + j), a);
    float lanes[L];
    V::store(lanes, a);
    for (int l = 0; l < L; ++l) m = lanes[l] > m ? lanes[l] : m;
  }
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

template <class V>
float exp_shift_sum(float* s, int64_t n, float shift) {
  using Reg = typename V::Reg;
  constexpr int L = V::kLanes;
  const Reg sh = V::set1(shift);
  Reg acc = V::set1(0.0f);
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const Reg p = exp_simd<V>(V::sub(V::load(s + j), sh));
    V::store(s + j, p);
    acc = V::add(acc, p);
  }
  float sum = V::hsum(acc);
  for (; j < n; ++j) {
    s[j] = exp_scalar(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

template <class V>
float softmax_xent_row(float* z, int64_t n, int64_t label) {
  if (label < 0) {
    std::fill(z, z + n, 0.0f);
    return 0.0f;
  }
  const float m = row_max<V>(z, n);
  const float picked = z[label];
  const float sum = exp_shift_sum<V>(z, n, m);
  const float inv = 1.0f / sum;
  const typename V::Reg iv = V::set1(inv);
  int64_t i = 0;
  for (; i + V::kLanes <= n; i += V::kLanes) V::store(z + i, V::mul(V::load(z + i), iv));
  for (; i < n; ++i) z[i] *= inv;
  z[label] -= 1.0f;
  return (m + std::log(sum)) - picked;
}

template <class V>
NormActKernels norm_act_table() {
  return {rms_forward_row<V>, rms_backward_row<V>, swiglu_forward<V>, swiglu_backward<V>, exp_range<V>,
          softmax_xent_row<V>};
}

}  // namespace
}  // namespace qk
