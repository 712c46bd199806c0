// The rank-r products of a LoRA layer at training sizes (hundreds of rows), forward and
// backward, on the register-tiled block products of attention.h (the same three shapes:
// rows x transposed rows, rows x rows, and the transposed accumulate). As torch matmuls
// these skinny products (r = 8-64 against 576-4096 features) ran at 50-80 GFLOP/s on
// 2 cores, each with its own dispatch, OpenMP fork/join and fresh [rows, features] output;
// here one call runs them all with one parallel region, and the branch's share of the
// input gradient is added into the base layer's (no extra tensor, no extra pass).
//
// Each output element is summed by one thread in a fixed order (rows split for u, du and
// dx; features split for dA and dB): the result does not depend on the thread count.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "attention.h"
#include "require.h"

namespace py = pybind11;

namespace {

void check_numel(const char* name, int64_t numel, int64_t expected) {
  QK_REQUIRE(numel == expected, std::string(name) + " has " + std::to_string(numel) + " elements, expected " +
                                    std::to_string(expected));
}

void check_dims(int64_t M, int64_t K, int64_t N, int64_t r) {
  QK_REQUIRE(M >= 1 && K >= 1 && N >= 1 && r >= 1, "every dimension must be >= 1");
  QK_REQUIRE(M <= (int64_t(1) << 32) && K <= (int64_t(1) << 24) && N <= (int64_t(1) << 24) && r <= 4096,
             "shape out of range");
}

int64_t padded(int64_t n) { return (n + qk::kAttnPad - 1) / qk::kAttnPad * qk::kAttnPad; }

// Part t of T over [0, n), boundaries on multiples of `align` (whole vector tiles).
int64_t part(int64_t n, int T, int t, int64_t align) {
  if (t >= T) return n;
  const int64_t units = (n + align - 1) / align;
  return std::min(n, units * t / T * align);
}

int threads_for(int64_t work, int nthreads) {
  // below ~64K multiply-adds per thread a parallel region costs more than it saves
  return static_cast<int>(std::clamp<int64_t>(work >> 16, 1, std::max(nthreads, 1)));
}

// u = x A^T [M, r];  y += scaling * u B^T.  x [M, K] (dropout already applied), A [r, K],
// B [N, r], y [M, N], all contiguous fp32.
void lora_rows_forward(uintptr_t x, int64_t x_numel, int64_t M, int64_t K, uintptr_t A, int64_t A_numel, uintptr_t B,
                       int64_t B_numel, int64_t r, double scaling, uintptr_t y, int64_t y_numel, int64_t N, uintptr_t u,
                       int64_t u_numel, int nthreads) {
  check_dims(M, K, N, r);
  check_numel("x", x_numel, M * K);
  check_numel("lora_A", A_numel, r * K);
  check_numel("lora_B", B_numel, N * r);
  check_numel("y", y_numel, M * N);
  check_numel("u", u_numel, M * r);
  QK_REQUIRE(x && A && B && y && u, "null data pointer");
  const auto& f = qk::attention_kernels();
  const float* Ap = ptr<const float>(A);
  const float* Bp = ptr<const float>(B);
  // A^T [K, r] with rows padded to whole vectors, B^T [r, N]
  const int64_t rp = padded(r);
  std::vector<float> At(static_cast<size_t>(K * rp), 0.0f), Bt(static_cast<size_t>(r * N));
  for (int64_t j = 0; j < r; ++j)
    for (int64_t k = 0; k < K; ++k) At[k * rp + j] = Ap[j * K + k];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < r; ++j) Bt[j * N + n] = Bp[n * r + j];
  const int T = threads_for(M * r * (K + N), nthreads);
  const qk::Mix add_scaled{static_cast<float>(scaling), nullptr, true};
#pragma omp parallel for schedule(static, 1) num_threads(T)
  for (int t = 0; t < T; ++t) {
    const int64_t i0 = part(M, T, t, 4), i1 = part(M, T, t + 1, 4);
    if (i1 <= i0) continue;
    float* up = ptr<float>(u) + i0 * r;
    f.rows_by_cols(ptr<const float>(x) + i0 * K, K, At.data(), rp, i1 - i0, r, K, 1.0f, up, r, -1);
    f.rows_by_rows(up, r, Bt.data(), N, i1 - i0, r, N, add_scaled, ptr<float>(y) + i0 * N, N, -1);
  }
}

// From dy [M, N], x [M, K] (dropout applied), u [M, r] (the forward's), A [r, K], B [N, r]:
// dA = scaling (dy B)^T x [r, K], dB = scaling dy^T u [N, r], and (dx != 0) dx [M, K] +=
// scaling (dy B) A.
void lora_rows_backward(uintptr_t dy, int64_t dy_numel, uintptr_t x, int64_t x_numel, uintptr_t u, int64_t u_numel,
                        int64_t M, int64_t K, int64_t N, uintptr_t A, int64_t A_numel, uintptr_t B, int64_t B_numel,
                        int64_t r, double scaling, uintptr_t dA, int64_t dA_numel, uintptr_t dB, int64_t dB_numel,
                        uintptr_t dx, int64_t dx_numel, int nthreads) {
  check_dims(M, K, N, r);
  check_numel("dy", dy_numel, M * N);
  check_numel("x", x_numel, M * K);
  check_numel("u", u_numel, M * r);
  check_numel("lora_A", A_numel, r * K);
  check_numel("lora_B", B_numel, N * r);
  check_numel("dA", dA_numel, r * K);
  check_numel("dB", dB_numel, N * r);
  if (dx) check_numel("dx", dx_numel, M * K);
  QK_REQUIRE(dy && x && u && A && B && dA && dB, "null data pointer");
  const auto& f = qk::attention_kernels();
  const float s = static_cast<float>(scaling);
  std::vector<float> du(static_cast<size_t>(M * r)), dBt(static_cast<size_t>(r * N), 0.0f);
  float* dAp = ptr<float>(dA);
  std::fill(dAp, dAp + r * K, 0.0f);
  const int T = threads_for(M * r * (K + N), nthreads);
  const int64_t cols = 2 * qk::kAttnPad;  // feature splits on whole 2-vector tiles
#pragma omp parallel num_threads(T)
  {
#pragma omp for schedule(static, 1)
    for (int t = 0; t < T; ++t) {  // du = scaling dy B
      const int64_t i0 = part(M, T, t, 4), i1 = part(M, T, t + 1, 4);
      if (i1 > i0)
        f.rows_by_rows(ptr<const float>(dy) + i0 * N, N, ptr<const float>(B), r, i1 - i0, N, r, {s, nullptr, false},
                       du.data() + i0 * r, r, -1);
    }
#pragma omp for schedule(static, 1)
    for (int t = 0; t < T; ++t) {
      // dA[:, cols] = du^T x[:, cols];  dB^T[:, cols] = u^T dy[:, cols]
      const int64_t k0 = part(K, T, t, cols), k1 = part(K, T, t + 1, cols);
      if (k1 > k0) f.cols_by_rows_acc(du.data(), r, ptr<const float>(x) + k0, K, M, r, k1 - k0, dAp + k0, K, -1);
      const int64_t n0 = part(N, T, t, cols), n1 = part(N, T, t + 1, cols);
      if (n1 > n0) {
        f.cols_by_rows_acc(ptr<const float>(u), r, ptr<const float>(dy) + n0, N, M, r, n1 - n0, dBt.data() + n0, N,
                           -1);
        float* dBp = ptr<float>(dB);
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t j = 0; j < r; ++j) dBp[n * r + j] = s * dBt[static_cast<size_t>(j * N + n)];
      }
      if (dx) {  // dx += du A
        const int64_t i0 = part(M, T, t, 4), i1 = part(M, T, t + 1, 4);
        if (i1 > i0)
          f.rows_by_rows(du.data() + i0 * r, r, ptr<const float>(A), K, i1 - i0, r, K, {1.0f, nullptr, true},
                         ptr<float>(dx) + i0 * K, K, -1);
      }
    }
  }
}

}  // namespace

void register_lora_rows(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("lora_rows_forward", &lora_rows_forward, nogil,
        "LoRA forward tail for many rows: u = x A^T, y += scaling u B^T (contiguous fp32, sizes checked).");
  m.def("lora_rows_backward", &lora_rows_backward, nogil,
        "LoRA backward for many rows: dA, dB overwritten; dx (if not 0) += scaling (dy B) A.");
}
