// Rotary position embedding of a decoder's queries and keys (RoFormer, Su et al. 2021, eq.
// 34, in the "rotate half" layout of transformers' apply_rotary_pos_emb), forward and
// backward, one pass each way:
//
//   out[j] = x[j] c[j] - x[j + h] s[j]      (j < h = D / 2)
//   out[j] = x[j] c[j] + x[j - h] s[j]      (j >= h)
//   backward: dx[j] = dy[j] c[j] + dy[j + h] s[j + h]  (j < h);  dy[j] c[j] - dy[j - h] s[j - h]  (j >= h)
//
// Why native: in PyTorch ops that is two multiplies, two slices, a negation, a concatenation
// and an add per tensor, each a pass with a fresh tensor, and as many again backward
// (~0.9 ms a layer of SmolLM2's training step). Each product is rounded before the add, as
// torch rounds them (the build has no FMA contraction), so the values are torch's.
//
// x is read through its strides (transformers hands over a [B, H, S, D] transpose of the
// projection's [B, S, H, D] output); out is written as a contiguous [B, S, H, D] buffer,
// the layout the projection gradient and the fused attention want. cos and sin are
// [Bc, S, D] (Bc = 1 or B), contiguous.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "require.h"

namespace py = pybind11;

namespace {

template <bool Backward>
void rotate_row(const float* x, const float* c, const float* s, float* o, int64_t h) {
  if (Backward) {
    for (int64_t j = 0; j < h; ++j) o[j] = x[j] * c[j] + x[j + h] * s[j + h];
    for (int64_t j = h; j < 2 * h; ++j) o[j] = x[j] * c[j] - x[j - h] * s[j - h];
  } else {
    for (int64_t j = 0; j < h; ++j) o[j] = x[j] * c[j] - x[j + h] * s[j];
    for (int64_t j = h; j < 2 * h; ++j) o[j] = x[j] * c[j] + x[j - h] * s[j];
  }
}

// x element (b, h, s, d) at x[b*sb + h*sh + s*ss + d]; cos/sin (b, s, d) at b*cb + s*D + d.
void rope(uintptr_t x, int64_t x_span, int64_t sb, int64_t sh, int64_t ss, int64_t B, int64_t H, int64_t S,
          int64_t D, uintptr_t cos, uintptr_t sin, int64_t cs_numel, int64_t cb, uintptr_t out, int64_t out_numel,
          bool backward, int nthreads) {
  QK_REQUIRE(B >= 0 && H >= 0 && S >= 0, "B, H and S must be >= 0");
  QK_REQUIRE(D >= 2 && D % 2 == 0 && D <= (int64_t(1) << 20), "the head size D must be even and in [2, 2^20]");
  QK_REQUIRE(B <= (int64_t(1) << 24) && H <= (int64_t(1) << 24) && S <= (int64_t(1) << 24), "shape out of range");
  int64_t numel = 0;
  QK_REQUIRE(!__builtin_mul_overflow(B * H, S, &numel) && !__builtin_mul_overflow(numel, D, &numel) &&
                 out_numel == numel,
             "out has " + std::to_string(out_numel) + " elements, expected B*H*S*D");
  if (out_numel == 0) return;
  QK_REQUIRE(sb >= 0 && sh >= 0 && ss >= 0, "x strides must be >= 0");
  // the last element x is read at must lie inside the span the caller vouches for
  QK_REQUIRE((B - 1) * sb + (H - 1) * sh + (S - 1) * ss + D <= x_span, "x strides reach past its storage");
  QK_REQUIRE(cb == 0 || cb == S * D, "cos/sin batch stride must be 0 or S*D");
  QK_REQUIRE(cs_numel == (cb == 0 ? S * D : B * S * D), "cos/sin have " + std::to_string(cs_numel) +
                                                            " elements, expected [1 or B, S, D]");
  QK_REQUIRE(x && cos && sin && out, "null data pointer");
  const float* xp = ptr<const float>(x);
  const float* cp = ptr<const float>(cos);
  const float* sp = ptr<const float>(sin);
  float* op = ptr<float>(out);
  const int64_t rows = B * S, h = D / 2;
  // below ~64K elements a parallel region costs more than it saves
  const int T = static_cast<int>(std::clamp<int64_t>(out_numel >> 16, 1, std::max(nthreads, 1)));
#pragma omp parallel for schedule(static) num_threads(T)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / S, s = r % S;
    const float* c = cp + b * cb + s * D;
    const float* sn = sp + b * cb + s * D;
    for (int64_t hh = 0; hh < H; ++hh) {
      const float* xr = xp + b * sb + hh * sh + s * ss;
      float* o = op + (r * H + hh) * D;
      if (backward)
        rotate_row<true>(xr, c, sn, o, h);
      else
        rotate_row<false>(xr, c, sn, o, h);
    }
  }
}

}  // namespace

void register_rope(py::module_& m) {
  m.def("rope", &rope, py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("x_span"), py::arg("sb"),
        py::arg("sh"), py::arg("ss"), py::arg("B"), py::arg("H"), py::arg("S"), py::arg("D"), py::arg("cos"),
        py::arg("sin"), py::arg("cs_numel"), py::arg("cb"), py::arg("out"), py::arg("out_numel"),
        py::arg("backward"), py::arg("nthreads"),
        "Rotary embedding (rotate-half layout) of x [B, H, S, D] (strided, D contiguous) into a contiguous "
        "[B, S, H, D] out; backward=True applies the transpose (the input gradient).");
}
