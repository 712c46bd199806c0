// Bindings of the fused RMSNorm / SwiGLU (norm_act.h). Python passes data pointers with
// the element counts it allocated (for the SwiGLU inputs, a row stride and the elements
// their storage holds past the pointer: Phi-3's gate and up are the two halves of one
// gate_up_proj output); every count is checked against the shape before a kernel runs.
// Rows are split over threads in fixed contiguous runs.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "dispatch.h"
#include "norm_act.h"
#include "require.h"

namespace py = pybind11;

namespace qk {

const NormActKernels& norm_act_kernels() {
#if defined(QK_X86)
  return table_for_current_isa<NormActKernels, norm_act_scalar, norm_act_avx2, norm_act_avx512>();
#else
  static const NormActKernels scalar = norm_act_scalar();
  return scalar;
#endif
}

}  // namespace qk

namespace {

// Below ~16K elements per thread a parallel region costs more than it saves.
int threads_for(int64_t rows, int64_t cols, int nthreads) {
  const int64_t by_work = std::max<int64_t>(1, rows * std::max<int64_t>(cols, 1) / (int64_t(1) << 14));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({int64_t(std::max(nthreads, 1)), rows, by_work})));
}

// Rows [t*M/T, (t+1)*M/T) go to part t: the same split for the same T, whatever OpenMP does.
template <class F>
void for_row_parts(int64_t M, int T, F&& body) {
  if (T == 1) return body(0, int64_t(0), M);  // decode-sized calls: no parallel region to wake
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) body(t, M * t / T, M * (t + 1) / T);
}

// Every M * K product below is of a checked shape: a wrapped product would let a short buffer
// pass its element count check.
void check_shape(int64_t M, int64_t K) {
  int64_t n = 0;
  QK_REQUIRE(M >= 0 && K >= 0 && M <= (int64_t(1) << 40) && K <= (int64_t(1) << 31) &&
                 !__builtin_mul_overflow(M, K, &n) && n <= (int64_t(1) << 60),
             "shape [" + std::to_string(M) + ", " + std::to_string(K) + "] is out of range");
}

void check_numel(const char* name, int64_t numel, int64_t expected) {
  QK_REQUIRE(numel == expected, std::string(name) + " has " + std::to_string(numel) + " elements, expected " +
                                    std::to_string(expected));
}

void rms_norm_forward(uintptr_t x, int64_t x_numel, int64_t M, int64_t K, uintptr_t w, int64_t w_numel, double eps,
                      uintptr_t y, int64_t y_numel, uintptr_t rstd, int64_t rstd_numel, int nthreads) {
  check_shape(M, K);
  QK_REQUIRE(K >= 1, "the normalized dimension must be >= 1");
  check_numel("x", x_numel, M * K);
  check_numel("weight", w_numel, K);
  check_numel("y", y_numel, M * K);
  check_numel("rstd", rstd_numel, M);
  if (M == 0) return;
  QK_REQUIRE(x && w && y && rstd, "null data pointer");
  const auto f = qk::norm_act_kernels().rms_forward_row;
  const float e = static_cast<float>(eps);
  for_row_parts(M, threads_for(M, K, nthreads), [&](int, int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) f(ptr<const float>(x) + i * K, ptr<const float>(w), K, e, ptr<float>(y) + i * K, ptr<float>(rstd) + i);
  });
}

void rms_norm_backward(uintptr_t dy, int64_t dy_numel, uintptr_t x, int64_t x_numel, uintptr_t w, int64_t w_numel,
                       uintptr_t rstd, int64_t rstd_numel, int64_t M, int64_t K, uintptr_t dx, int64_t dx_numel,
                       uintptr_t dw, int64_t dw_numel, int nthreads) {
  check_shape(M, K);
  QK_REQUIRE(K >= 1, "the normalized dimension must be >= 1");
  for (auto [name, n] : {std::pair{"dy", dy_numel}, {"x", x_numel}, {"dx", dx_numel}}) check_numel(name, n, M * K);
  check_numel("weight", w_numel, K);
  check_numel("rstd", rstd_numel, M);
  if (dw) check_numel("dweight", dw_numel, K);
  QK_REQUIRE(M == 0 || (dy && x && w && rstd && dx), "null data pointer");
  const auto f = qk::norm_act_kernels().rms_backward_row;
  const int T = threads_for(M, K, nthreads);
  // one partial dweight per row part, summed below in part order: deterministic for a given T
  std::vector<float> partial(dw ? static_cast<size_t>(T) * static_cast<size_t>(K) : 0, 0.0f);
  if (M > 0) {
    for_row_parts(M, T, [&](int t, int64_t b, int64_t end) {
      float* acc = dw ? partial.data() + static_cast<size_t>(t) * static_cast<size_t>(K) : nullptr;
      for (int64_t i = b; i < end; ++i)
        f(ptr<const float>(dy) + i * K, ptr<const float>(x) + i * K, ptr<const float>(w), ptr<const float>(rstd)[i], K,
          ptr<float>(dx) + i * K, acc);
    });
  }
  if (!dw) return;
  float* out = ptr<float>(dw);
  std::copy(partial.begin(), partial.begin() + K, out);
  for (int t = 1; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) out[k] += partial[static_cast<size_t>(t) * static_cast<size_t>(K) + k];
}

// A [M, N] operand with row stride ld, `span` elements reachable from its pointer (what its
// storage holds past it): the last row must end inside.
void check_strided(const char* name, int64_t M, int64_t N, int64_t ld, int64_t span) {
  QK_REQUIRE(M <= 1 || ld >= N, std::string(name) + ": row stride " + std::to_string(ld) + " is below the row length " +
                                     std::to_string(N) + " (rows would overlap)");
  int64_t end = 0;
  QK_REQUIRE(M == 0 || N == 0 ||
                 (ld <= (int64_t(1) << 40) && !__builtin_mul_overflow(M - 1, ld, &end) &&
                  !__builtin_add_overflow(end, N, &end) && end <= span),
             std::string(name) + ": " + std::to_string(M) + " rows of " + std::to_string(N) + " at stride " +
                 std::to_string(ld) + " reach past the " + std::to_string(span) + " elements it holds");
}

void swiglu_forward(uintptr_t g, int64_t g_span, int64_t ld_g, uintptr_t u, int64_t u_span, int64_t ld_u, int64_t M,
                    int64_t N, uintptr_t h, int64_t h_numel, int nthreads) {
  check_shape(M, N);
  check_strided("gate", M, N, ld_g, g_span);
  check_strided("up", M, N, ld_u, u_span);
  check_numel("h", h_numel, M * N);
  if (M == 0 || N == 0) return;
  QK_REQUIRE(g && u && h, "null data pointer");
  const auto f = qk::norm_act_kernels().swiglu_forward;
  const bool flat = (M == 1 || (ld_g == N && ld_u == N));
  if (flat) {  // one range, so that few long rows still spread over the threads
    const int64_t n = M * N;
    for_row_parts(n, threads_for(n, 1, nthreads), [&](int, int64_t b, int64_t e) {
      f(ptr<const float>(g) + b, ptr<const float>(u) + b, e - b, ptr<float>(h) + b);
    });
    return;
  }
  for_row_parts(M, threads_for(M, N, nthreads), [&](int, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(ptr<const float>(g) + i * ld_g, ptr<const float>(u) + i * ld_u, N, ptr<float>(h) + i * N);
  });
}

void swiglu_backward(uintptr_t dh, int64_t dh_numel, uintptr_t g, int64_t g_span, int64_t ld_g, uintptr_t u,
                     int64_t u_span, int64_t ld_u, int64_t M, int64_t N, uintptr_t dg, int64_t dg_numel, uintptr_t du,
                     int64_t du_numel, int nthreads) {
  check_shape(M, N);
  check_strided("gate", M, N, ld_g, g_span);
  check_strided("up", M, N, ld_u, u_span);
  for (auto [name, n] : {std::pair{"dh", dh_numel}, {"dgate", dg_numel}, {"dup", du_numel}}) check_numel(name, n, M * N);
  if (M == 0 || N == 0) return;
  QK_REQUIRE(dh && g && u && dg && du, "null data pointer");
  const auto f = qk::norm_act_kernels().swiglu_backward;
  if (M == 1 || (ld_g == N && ld_u == N)) {
    const int64_t n = M * N;
    for_row_parts(n, threads_for(n, 1, nthreads), [&](int, int64_t b, int64_t e) {
      f(ptr<const float>(dh) + b, ptr<const float>(g) + b, ptr<const float>(u) + b, e - b, ptr<float>(dg) + b, ptr<float>(du) + b);
    });
    return;
  }
  for_row_parts(M, threads_for(M, N, nthreads), [&](int, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      f(ptr<const float>(dh) + i * N, ptr<const float>(g) + i * ld_g, ptr<const float>(u) + i * ld_u, N,
        ptr<float>(dg) + i * N, ptr<float>(du) + i * N);
  });
}

void exp_f32(uintptr_t x, int64_t x_numel, uintptr_t y, int64_t y_numel) {
  check_numel("y", y_numel, x_numel);
  QK_REQUIRE(x_numel >= 0, "x_numel must be >= 0");
  if (x_numel == 0) return;
  QK_REQUIRE(x && y, "null data pointer");
  qk::norm_act_kernels().exp(ptr<const float>(x), x_numel, ptr<float>(y));
}

// Rows of logits z [M, V] overwritten with their cross-entropy gradient; loss[i] written;
// labels int64, < 0 for an ignored row. Every label >= V is refused before any row runs.
void softmax_xent_rows(uintptr_t z, int64_t z_numel, int64_t M, int64_t V, uintptr_t labels, int64_t labels_numel,
                       uintptr_t loss, int64_t loss_numel, int nthreads) {
  check_shape(M, V);
  QK_REQUIRE(V >= 1, "the vocabulary must be >= 1");
  check_numel("logits", z_numel, M * V);
  check_numel("labels", labels_numel, M);
  check_numel("loss", loss_numel, M);
  if (M == 0) return;
  QK_REQUIRE(z && labels && loss, "null data pointer");
  const int64_t* lab = ptr<const int64_t>(labels);
  for (int64_t i = 0; i < M; ++i)
    QK_REQUIRE(lab[i] < V, "labels[" + std::to_string(i) + "] = " + std::to_string(lab[i]) + " is outside [0, " +
                               std::to_string(V) + ")");
  const auto f = qk::norm_act_kernels().softmax_xent_row;
  for_row_parts(M, threads_for(M, V, nthreads), [&](int, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) ptr<float>(loss)[i] = f(ptr<float>(z) + i * V, V, lab[i]);
  });
}

}  // namespace

void register_norm_act(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("rms_norm_forward", &rms_norm_forward, nogil,
        "RMSNorm of M contiguous fp32 rows of K: y = w * (x * rstd), rstd = 1/sqrt(mean(x^2) + eps) per row.");
  m.def("rms_norm_backward", &rms_norm_backward, nogil,
        "RMSNorm backward: dx per row, and dweight (dw != 0) summed over rows per thread part in a fixed order.");
  m.def("swiglu_forward", &swiglu_forward, nogil,
        "h = silu(gate) * up over M rows of N (gate/up rows ld_g/ld_u apart within g_span/u_span elements, "
        "h contiguous).");
  m.def("swiglu_backward", &swiglu_backward, nogil,
        "(dgate, dup) of h = silu(gate) * up, sigmoid recomputed from gate; dh, dgate, dup contiguous.");
  m.def("softmax_xent_rows", &softmax_xent_rows, nogil,
        "Cross-entropy per row of fp32 logits [M, V] (labels int64, < 0 ignored): loss written, logits overwritten "
        "with softmax - onehot.");
  m.def("exp_f32", &exp_f32, nogil, "The vectorized exp of the SwiGLU kernels over n fp32 values (for tests).");
}
