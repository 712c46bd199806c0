// Bindings and thread split of the training attention (attention.h). Python passes each
// 4-D tensor as (data pointer, elements reachable from it, batch / head / position
// strides), the last dimension contiguous; every index the kernels can form is checked
// against that span before a kernel runs (in overflow-checked arithmetic), an output's
// elements must not overlap each other (threads write them) nor any other argument.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "attention.h"
#include "dispatch.h"
#include "require.h"

namespace py = pybind11;

namespace qk {

const AttnKernels& attention_kernels() {
#if defined(QK_X86)
  return table_for_current_isa<AttnKernels, attention_scalar, attention_avx2, attention_avx512>();
#else
  static const AttnKernels scalar = attention_scalar();
  return scalar;
#endif
}

}  // namespace qk

namespace {

// (pointer, span, batch stride, head stride, position stride)
using View = std::tuple<uintptr_t, int64_t, int64_t, int64_t, int64_t>;

struct T4 {
  float* p;
  int64_t sb, sh, ss;
  float* at(int64_t b, int64_t h, int64_t s) const { return p + b * sb + h * sh + s * ss; }
};

struct Dims {
  int64_t B, H, Hk, S, D;
};

// Query rows per block: the block's score rows (rows x keys) stay within ~256 KiB.
int64_t block_rows(int64_t S) { return std::clamp<int64_t>((int64_t(1) << 16) / std::max<int64_t>(S, 1), 4, 64); }

// a * b + c, refused past 2^60 (no index or element count of these kernels comes near)
int64_t madd_checked(int64_t a, int64_t b, int64_t c, const std::string& what) {
  int64_t r;
  QK_REQUIRE(!__builtin_mul_overflow(a, b, &r) && !__builtin_add_overflow(r, c, &r) && r <= (int64_t(1) << 60),
             what + " is too large");
  return r;
}

// Byte range [begin, end) a view's indices reach.
struct Extent {
  uintptr_t begin = 0, end = 0;
};

bool overlap(const Extent& a, const Extent& b) { return a.begin < b.end && b.begin < a.end; }

T4 checked(const char* name, const View& v, int64_t B, int64_t heads, const Dims& d, Extent* extent = nullptr) {
  const auto [p, span, sb, sh, ss] = v;
  QK_REQUIRE(sb >= 0 && sh >= 0 && ss >= 0, std::string(name) + ": negative stride");
  int64_t last = madd_checked(B - 1, sb, d.D - 1, name);
  last = madd_checked(heads - 1, sh, last, name);
  last = madd_checked(d.S - 1, ss, last, name);
  QK_REQUIRE(last < span, std::string(name) + ": its strides reach element " + std::to_string(last) + " of " +
                              std::to_string(span));
  QK_REQUIRE(p != 0, std::string(name) + ": null data pointer");
  if (extent) *extent = {p, p + static_cast<uintptr_t>(madd_checked(last + 1, 4, 0, name))};
  return {ptr<float>(p), sb, sh, ss};
}

// An output view: checked, and no two of its elements at one address (each dimension's stride
// passes everything the smaller-strided dimensions reach), or threads would race on it.
T4 checked_out(const char* name, const View& v, int64_t B, int64_t heads, const Dims& d, Extent* extent) {
  const T4 t = checked(name, v, B, heads, d, extent);
  std::pair<int64_t, int64_t> dims[3] = {{std::get<2>(v), B}, {std::get<3>(v), heads}, {std::get<4>(v), d.S}};
  std::sort(std::begin(dims), std::end(dims));
  int64_t reach = d.D - 1;  // the largest offset the dimensions so far reach
  for (const auto& [stride, n] : dims) {
    if (n == 1) continue;
    QK_REQUIRE(stride > reach, std::string(name) + ": its elements overlap (stride " + std::to_string(stride) +
                                   " within the " + std::to_string(reach + 1) + " elements of the dimensions below)");
    reach = madd_checked(n - 1, stride, reach, name);
  }
  return t;
}

void require_apart(const char* out, const Extent& o, std::initializer_list<std::pair<const char*, Extent>> others) {
  for (const auto& [name, e] : others)
    QK_REQUIRE(!overlap(o, e), std::string(out) + " overlaps " + name);
}

Dims check_dims(int64_t B, int64_t H, int64_t Hk, int64_t S, int64_t D) {
  QK_REQUIRE(B >= 1 && H >= 1 && Hk >= 1 && S >= 1 && D >= 1, "every dimension must be >= 1");
  QK_REQUIRE(H % Hk == 0, "query heads (" + std::to_string(H) + ") must be a multiple of key/value heads (" +
                              std::to_string(Hk) + ")");
  QK_REQUIRE(B <= (int64_t(1) << 24) && H <= (int64_t(1) << 16) && S <= (int64_t(1) << 24) && D <= (int64_t(1) << 16),
             "shape out of range");
  // the element counts formed below (q, out and dq: B*H*S*D; lse: B*H*S; the padded key
  // transpose: B*Hk*D*(S + 15)) stay far from overflowing
  madd_checked(madd_checked(madd_checked(B, H, 0, "B*H"), S + qk::kAttnPad, 0, "B*H*S"), D, 0, "B*H*S*D");
  return {B, H, Hk, S, D};
}

// Key rows padded to whole vectors (attention.h: rows_by_cols reads them so).
int64_t padded(int64_t S) { return (S + qk::kAttnPad - 1) / qk::kAttnPad * qk::kAttnPad; }

// kt[d * ld + j] = k[j, d] for j < n, zeros for n <= j < ld
void transpose_rows(const float* k, int64_t ldk, int64_t n, int64_t D, int64_t ld, float* kt) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * ld + j] = k[j * ldk + d];
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * ld + n, kt + (d + 1) * ld, 0.0f);
}

// Keys each batch row's queries may see (right padding: keys past a sequence's length are
// masked, as transformers' sdpa mask does): lens[b] in [1, S], or S for every row (null).
std::vector<int64_t> key_lengths(uintptr_t lens, int64_t lens_numel, int64_t B, int64_t S) {
  std::vector<int64_t> kl(static_cast<size_t>(B), S);
  if (lens == 0) return kl;
  QK_REQUIRE(lens_numel == B, "key_lengths has " + std::to_string(lens_numel) + " elements, expected " +
                                  std::to_string(B));
  const int64_t* p = ptr<const int64_t>(lens);
  for (int64_t b = 0; b < B; ++b) {
    QK_REQUIRE(p[b] >= 1 && p[b] <= S, "key_lengths[" + std::to_string(b) + "] = " + std::to_string(p[b]) +
                                           " is outside [1, " + std::to_string(S) + "]");
    kl[static_cast<size_t>(b)] = p[b];
  }
  return kl;
}

void attention_forward(const View& q, const View& k, const View& v, int64_t B, int64_t H, int64_t Hk, int64_t S,
                       int64_t D, double scale, const View& o, uintptr_t lse, int64_t lse_numel, uintptr_t lens,
                       int64_t lens_numel, int nthreads) {
  const Dims d = check_dims(B, H, Hk, S, D);
  const std::vector<int64_t> kl = key_lengths(lens, lens_numel, B, S);
  Extent eq, ek, ev, eo;
  const T4 Q = checked("q", q, B, H, d, &eq), K = checked("k", k, B, Hk, d, &ek), Vv = checked("v", v, B, Hk, d, &ev);
  const T4 O = checked_out("out", o, B, H, d, &eo);
  QK_REQUIRE(lse_numel == B * H * S, "lse has " + std::to_string(lse_numel) + " elements, expected " +
                                         std::to_string(B * H * S));
  QK_REQUIRE(lse != 0, "lse: null data pointer");
  const Extent el{lse, lse + static_cast<uintptr_t>(lse_numel) * 4};
  require_apart("out", eo, {{"q", eq}, {"k", ek}, {"v", ev}, {"lse", el}});
  require_apart("lse", el, {{"q", eq}, {"k", ek}, {"v", ev}});
  float* L = ptr<float>(lse);
  const auto& f = qk::attention_kernels();
  const int64_t G = H / Hk, bq = block_rows(S), nb = (S + bq - 1) / bq;
  const int64_t tasks = B * H * nb;
  const float sc = static_cast<float>(scale);
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(nthreads, 1), tasks)));
  // every key head transposed once ([D, S] each), not once per query block that reads it
  const int64_t Sp = padded(S);
  std::vector<float> kt(static_cast<size_t>(B * Hk * D * Sp));
  // per-thread scratch allocated here, not inside the parallel region, where a failed
  // allocation could not reach Python as an exception
  const size_t per = static_cast<size_t>(bq * S + bq);
  std::vector<float> scratch(per * static_cast<size_t>(T));
#pragma omp parallel for schedule(static) num_threads(T)
  for (int64_t t = 0; t < B * Hk; ++t)
    transpose_rows(K.at(t / Hk, t % Hk, 0), K.ss, S, D, Sp, kt.data() + t * D * Sp);
  std::atomic<int64_t> next{0};
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int th = 0; th < T; ++th) {
    float* p = scratch.data() + per * static_cast<size_t>(th);
    float* inv = p + bq * S;
    // tasks claimed in order, the last (longest) query blocks first so the run ends on short ones
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const int64_t blk = nb - 1 - t % nb, bh = t / nb, b = bh / H, h = bh % H, kvh = h / G;
      const int64_t i0 = blk * bq, i1 = std::min(S, i0 + bq), nr = i1 - i0, kb = kl[static_cast<size_t>(b)];
      const int64_t kend = std::min(i1, kb);
      const float* kth = kt.data() + (b * Hk + kvh) * D * Sp;
      f.rows_by_cols(Q.at(b, h, i0), Q.ss, kth, Sp, nr, kend, D, sc, p, kend, i0);
      for (int64_t r = 0; r < nr; ++r) {
        float* row = p + r * kend;
        const int64_t n = std::min(i0 + r + 1, kb);
        const float m = f.row_max(row, n);
        const float sum = f.exp_shift_sum(row, n, m);
        std::fill(row + n, row + kend, 0.0f);
        L[(b * H + h) * S + i0 + r] = m + std::log(sum);
        inv[r] = 1.0f / sum;
      }
      f.rows_by_rows(p, kend, Vv.at(b, kvh, 0), Vv.ss, nr, kend, D, {1.0f, inv, false}, O.at(b, h, i0), O.ss, i0);
    }
  }
}

void attention_backward(const View& dout, const View& q, const View& k, const View& v, const View& o, uintptr_t lse,
                        int64_t lse_numel, int64_t B, int64_t H, int64_t Hk, int64_t S, int64_t D, double scale,
                        const View& dq, const View& dk, const View& dv, uintptr_t lens, int64_t lens_numel,
                        int nthreads) {
  const Dims d = check_dims(B, H, Hk, S, D);
  const std::vector<int64_t> kl = key_lengths(lens, lens_numel, B, S);
  Extent edo, eq, ek, ev, eo, edq, edk, edv;
  const T4 dO = checked("dout", dout, B, H, d, &edo), Q = checked("q", q, B, H, d, &eq);
  const T4 K = checked("k", k, B, Hk, d, &ek), Vv = checked("v", v, B, Hk, d, &ev), O = checked("out", o, B, H, d, &eo);
  const T4 dQ = checked_out("dq", dq, B, H, d, &edq), dK = checked_out("dk", dk, B, Hk, d, &edk);
  const T4 dV = checked_out("dv", dv, B, Hk, d, &edv);
  QK_REQUIRE(lse_numel == B * H * S, "lse has " + std::to_string(lse_numel) + " elements, expected " +
                                         std::to_string(B * H * S));
  QK_REQUIRE(lse != 0, "lse: null data pointer");
  const Extent el{lse, lse + static_cast<uintptr_t>(lse_numel) * 4};
  for (const auto& [name, e] : {std::pair{"dq", edq}, {"dk", edk}, {"dv", edv}})
    require_apart(name, e, {{"dout", edo}, {"q", eq}, {"k", ek}, {"v", ev}, {"out", eo}, {"lse", el}});
  require_apart("dq", edq, {{"dk", edk}, {"dv", edv}});
  require_apart("dk", edk, {{"dv", edv}});
  const float* L = ptr<const float>(lse);
  const auto& f = qk::attention_kernels();
  const int64_t G = H / Hk, bq = block_rows(S), nb = (S + bq - 1) / bq;
  const int64_t tasks = B * Hk;
  const float sc = static_cast<float>(scale);
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(nthreads, 1), tasks)));
  const int64_t Sp = padded(S);
  const size_t per = static_cast<size_t>(2 * D * Sp + 2 * bq * S);
  std::vector<float> scratch(per * static_cast<size_t>(T));  // see attention_forward
  std::atomic<int64_t> next{0};
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int th = 0; th < T; ++th) {
    float* kt = scratch.data() + per * static_cast<size_t>(th);
    float* vt = kt + D * Sp;
    float* p = vt + D * Sp;
    float* ds = p + bq * S;
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const int64_t b = t / Hk, kvh = t % Hk;
      transpose_rows(K.at(b, kvh, 0), K.ss, S, D, Sp, kt);
      transpose_rows(Vv.at(b, kvh, 0), Vv.ss, S, D, Sp, vt);
      for (int64_t j = 0; j < S; ++j) {
        std::fill(dK.at(b, kvh, j), dK.at(b, kvh, j) + D, 0.0f);
        std::fill(dV.at(b, kvh, j), dV.at(b, kvh, j) + D, 0.0f);
      }
      for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
        for (int64_t blk = 0; blk < nb; ++blk) {
          const int64_t i0 = blk * bq, i1 = std::min(S, i0 + bq), nr = i1 - i0, kb = kl[static_cast<size_t>(b)];
          const int64_t kend = std::min(i1, kb);
          f.rows_by_cols(Q.at(b, h, i0), Q.ss, kt, Sp, nr, kend, D, sc, p, kend, i0);
          for (int64_t r = 0; r < nr; ++r) {
            float* row = p + r * kend;
            const int64_t n = std::min(i0 + r + 1, kb);
            f.exp_shift_sum(row, n, L[(b * H + h) * S + i0 + r]);
            std::fill(row + n, row + kend, 0.0f);
          }
          f.cols_by_rows_acc(p, kend, dO.at(b, h, i0), dO.ss, nr, kend, D, dV.at(b, kvh, 0), dV.ss, i0);
          f.rows_by_cols(dO.at(b, h, i0), dO.ss, vt, Sp, nr, kend, D, 1.0f, ds, kend, i0);
          for (int64_t r = 0; r < nr; ++r) {
            const float delta = f.dot(dO.at(b, h, i0 + r), O.at(b, h, i0 + r), D);
            float* dr = ds + r * kend;
            const int64_t n = std::min(i0 + r + 1, kb);
            f.softmax_grad(p + r * kend, dr, n, delta, sc);
            std::fill(dr + n, dr + kend, 0.0f);
          }
          f.rows_by_rows(ds, kend, K.at(b, kvh, 0), K.ss, nr, kend, D, {}, dQ.at(b, h, i0), dQ.ss, i0);
          f.cols_by_rows_acc(ds, kend, Q.at(b, h, i0), Q.ss, nr, kend, D, dK.at(b, kvh, 0), dK.ss, i0);
        }
      }
    }
  }
}

}  // namespace

void register_attention(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("attention_forward", &attention_forward, nogil,
        "Causal attention of fp32 q [B,H,S,D] over k, v [B,Hk,S,D] (views: pointer, span, strides): writes out "
        "(same layout as q's view) and lse [B,H,S]; key_lengths (int64 [B] or 0) masks keys past each row's "
        "length.");
  m.def("attention_backward", &attention_backward, nogil,
        "(dq, dk, dv) of attention_forward from dout, q, k, v, out and lse; dk, dv are overwritten.");
}
