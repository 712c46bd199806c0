// Bindings of the fused 4-bit linear kernels and the dense fp32 linear (dense.h). Python passes raw data pointers
// (tensor.data_ptr()) and every size; nothing is trusted: sizes must agree with each
// other, strides must cover a row, sizes must not overflow, and the output must not
// overlap an input. Violations raise std::invalid_argument (ValueError in Python).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dense.h"
#include "dispatch.h"
#include "require.h"
#include "linear4.h"
#include "linear4_q8.h"
#include "lora4.h"
#include "tuning.h"

namespace py = pybind11;

namespace {

std::string s(int64_t v) { return std::to_string(v); }

bool linear4_q8_repacked_fits_ok(int64_t N, int64_t K, int64_t blocksize) {
  return N >= 0 && K >= 0 && qk::linear4_q8_repacked_fits(N, K, blocksize);
}

int64_t mul_checked(int64_t a, int64_t b, const char* what) {
  int64_t r;
  QK_REQUIRE(!__builtin_mul_overflow(a, b, &r) && r <= (int64_t(1) << 60), std::string(what) + " is too large");
  return r;
}

// Byte range [begin, end) of a rows x cols fp32 matrix with row stride ld (empty if no elements).
struct Extent {
  uintptr_t begin = 0, end = 0;
};

Extent matrix_extent(uintptr_t p, int64_t rows, int64_t cols, int64_t ld, const char* name) {
  if (rows == 0 || cols == 0) return {};
  QK_REQUIRE(p != 0, std::string(name) + ": null data pointer");
  QK_REQUIRE(p % alignof(float) == 0, std::string(name) + ": data pointer is not 4-byte aligned");
  const int64_t span = mul_checked(rows - 1, ld, name) + cols;
  return {p, p + static_cast<uintptr_t>(mul_checked(span, 4, name))};
}

bool overlap(const Extent& a, const Extent& b) { return a.begin < b.end && b.begin < a.end; }

struct CheckedWeight {
  qk::Weight4 w;
  Extent packed, absmax, code;
};

// W is [N, K]; packed/absmax sizes must match exactly what quantize_4bit produced. The
// codebook is 16 fp32 entries, or 16 int8 ones (code_words = 4) for the int8 forward.
CheckedWeight check_weight(uintptr_t packed, int64_t packed_numel, uintptr_t absmax, int64_t absmax_numel,
                           uintptr_t code, int64_t N, int64_t K, int64_t blocksize, int64_t code_words = 16) {
  QK_REQUIRE(N >= 0 && K >= 0, "N and K must be >= 0, got N=" + s(N) + ", K=" + s(K));
  QK_REQUIRE(blocksize >= 2 && blocksize % 2 == 0 && blocksize <= (int64_t(1) << 30),
          "blocksize must be a positive even number, got " + s(blocksize));
  const int64_t n = mul_checked(N, K, "N*K");
  const int64_t nblocks = qk::block_count(n, blocksize);
  QK_REQUIRE(packed_numel == qk::packed_bytes(n), "packed has " + s(packed_numel) + " bytes, but a [" + s(N) + ", " +
                                                      s(K) + "] weight needs " + s(qk::packed_bytes(n)));
  QK_REQUIRE(absmax_numel == nblocks, "absmax has " + s(absmax_numel) + " entries, but a [" + s(N) + ", " + s(K) +
                                       "] weight with blocksize " + s(blocksize) + " needs " + s(nblocks));
  CheckedWeight c{{reinterpret_cast<const uint8_t*>(packed), reinterpret_cast<const float*>(absmax),
                   reinterpret_cast<const float*>(code), N, K, blocksize},
                  {},
                  {},
                  {}};
  if (n > 0) {
    QK_REQUIRE(packed != 0, "packed: null data pointer");
    c.packed = {packed, packed + static_cast<uintptr_t>(packed_numel)};
    c.absmax = matrix_extent(absmax, 1, absmax_numel, absmax_numel, "absmax");
    c.code = matrix_extent(code, 1, code_words, code_words, "code");
  }
  return c;
}

void check_output(const Extent& out, const char* name, std::initializer_list<std::pair<Extent, const char*>> inputs) {
  for (const auto& in : inputs)
    QK_REQUIRE(!overlap(out, in.first), std::string(name) + " must not overlap " + in.second);
}

Extent bias_extent(uintptr_t bias, int64_t bias_numel, int64_t N) {
  if (!bias) return {};
  QK_REQUIRE(bias_numel == N, "bias has " + s(bias_numel) + " entries, but the layer has N=" + s(N) + " outputs");
  return matrix_extent(bias, 1, N, N, "bias");
}

// x [M, K] (row stride ldx), bias [N] (bias_numel entries) or 0, y [M, N] (row stride ldy) of a forward call.
void check_forward_io(uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t bias, int64_t bias_numel, uintptr_t y,
                      int64_t N, int64_t ldy, const CheckedWeight& cw) {
  QK_REQUIRE(M >= 0, "M must be >= 0, got " + s(M));
  QK_REQUIRE(ldx >= K && ldx >= 1, "ldx (row stride of x) must be >= K=" + s(K) + ", got " + s(ldx));
  QK_REQUIRE(ldy >= N && ldy >= 1, "ldy (row stride of y) must be >= N=" + s(N) + ", got " + s(ldy));
  const Extent ex = matrix_extent(x, M, K, ldx, "x");
  const Extent ey = matrix_extent(y, M, N, ldy, "y");
  const Extent eb = bias_extent(bias, bias_numel, N);
  check_output(ey, "y", {{ex, "x"}, {eb, "bias"}, {cw.packed, "packed"}, {cw.absmax, "absmax"}, {cw.code, "code"}});
}

void linear4_forward(uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t packed, int64_t packed_numel,
                     uintptr_t absmax, int64_t absmax_numel, uintptr_t code, int64_t N, int64_t blocksize,
                     uintptr_t bias, int64_t bias_numel, uintptr_t y, int64_t ldy, int nthreads) {
  const CheckedWeight cw = check_weight(packed, packed_numel, absmax, absmax_numel, code, N, K, blocksize);
  check_forward_io(x, M, K, ldx, bias, bias_numel, y, N, ldy, cw);
  if (M == 0 || N == 0) return;
  qk::linear4_kernels().forward(reinterpret_cast<const float*>(x), M, ldx, cw.w,
                                bias ? reinterpret_cast<const float*>(bias) : nullptr, reinterpret_cast<float*>(y),
                                ldy, nthreads < 1 ? 1 : nthreads);
}

// The QLoRA forward of few rows in one call (lora4.h): the base layer as linear4_forward,
// then the adapter on the calling thread. A [r, K] and B [N, r] are contiguous fp32;
// noise [M, K] (row stride ldn) is the scaled dropout mask, or 0; u [M, r] is written
// (the backward needs it), or u_ptr is 0 and u lives here for the call (inference: it
// saves the caller an allocation). The checks of linear4_forward, and y and u may overlap
// no input nor each other.
void lora4_forward(uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t noise, int64_t ldn, uintptr_t packed,
                   int64_t packed_numel, uintptr_t absmax, int64_t absmax_numel, uintptr_t code, int64_t N,
                   int64_t blocksize, uintptr_t bias, int64_t bias_numel, uintptr_t a, uintptr_t b, int64_t r,
                   double scaling, uintptr_t y, int64_t ldy, uintptr_t u, int nthreads) {
  const CheckedWeight cw = check_weight(packed, packed_numel, absmax, absmax_numel, code, N, K, blocksize);
  check_forward_io(x, M, K, ldx, bias, bias_numel, y, N, ldy, cw);
  QK_REQUIRE(r >= 1, "r (the adapter's rank) must be >= 1, got " + s(r));
  QK_REQUIRE(!noise || (ldn >= K && ldn >= 1), "ldn (row stride of noise) must be >= K=" + s(K) + ", got " + s(ldn));
  const Extent ea = matrix_extent(a, r, K, K, "lora_A");
  const Extent eb = matrix_extent(b, N, r, r, "lora_B");
  const Extent en = noise ? matrix_extent(noise, M, K, ldn, "noise") : Extent{};
  const Extent eu = u ? matrix_extent(u, M, r, r, "u") : Extent{};
  const Extent ey = matrix_extent(y, M, N, ldy, "y");
  check_output(ey, "y", {{ea, "lora_A"}, {eb, "lora_B"}, {en, "noise"}, {eu, "u"}});
  check_output(eu, "u", {{matrix_extent(x, M, K, ldx, "x"), "x"}, {ea, "lora_A"}, {eb, "lora_B"}, {en, "noise"},
                         {bias_extent(bias, bias_numel, N), "bias"}, {cw.packed, "packed"}, {cw.absmax, "absmax"},
                         {cw.code, "code"}});
  if (M == 0) return;
  const auto* xp = reinterpret_cast<const float*>(x);
  float* yp = reinterpret_cast<float*>(y);
  if (N > 0)
    qk::linear4_kernels().forward(xp, M, ldx, cw.w, bias ? reinterpret_cast<const float*>(bias) : nullptr, yp, ldy,
                                  nthreads < 1 ? 1 : nthreads);
  const qk::LoraTail t{reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b), r,
                       static_cast<float>(scaling)};
  std::vector<float> own_u(u ? 0 : static_cast<size_t>(mul_checked(M, r, "M*r")));
  qk::lora4_tail()(xp, M, K, ldx, reinterpret_cast<const float*>(noise), ldn, t, yp, N, ldy,
                   u ? reinterpret_cast<float*>(u) : own_u.data());
}

void linear4_backward_input(uintptr_t dy, int64_t M, int64_t N, int64_t lddy, uintptr_t packed, int64_t packed_numel,
                            uintptr_t absmax, int64_t absmax_numel, uintptr_t code, int64_t K, int64_t blocksize,
                            uintptr_t dx, int64_t lddx, int nthreads) {
  QK_REQUIRE(M >= 0, "M must be >= 0, got " + s(M));
  const CheckedWeight cw = check_weight(packed, packed_numel, absmax, absmax_numel, code, N, K, blocksize);
  QK_REQUIRE(lddy >= N && lddy >= 1, "lddy (row stride of dy) must be >= N=" + s(N) + ", got " + s(lddy));
  QK_REQUIRE(lddx >= K && lddx >= 1, "lddx (row stride of dx) must be >= K=" + s(K) + ", got " + s(lddx));
  const Extent edy = matrix_extent(dy, M, N, lddy, "dy");
  const Extent edx = matrix_extent(dx, M, K, lddx, "dx");
  check_output(edx, "dx", {{edy, "dy"}, {cw.packed, "packed"}, {cw.absmax, "absmax"}, {cw.code, "code"}});
  if (M == 0 || K == 0) return;
  qk::linear4_kernels().backward_input(reinterpret_cast<const float*>(dy), M, lddy, cw.w, reinterpret_cast<float*>(dx),
                                       lddx, nthreads < 1 ? 1 : nthreads);
}

// The int8 definition's limits (linear4_q8.h) on a caller's own table and blocksize.
void check_q8(uintptr_t code8, int64_t blocksize, bool has_weight) {
  QK_REQUIRE(blocksize <= qk::kQ8MaxBlocksize,
             "blocksize must be at most 65536 for int8 compute (the exact integer sums of a block are int32), got " +
                 s(blocksize));
  QK_REQUIRE(!has_weight || qk::linear4_q8_code_ok(reinterpret_cast<const int8_t*>(code8)),
             "code8 must hold values in [-127, 127] (rint(code * 127)), got -128");
}

// The int8-compute forward (linear4_q8.h): the same checks; code8 is 16 int8 entries.
void linear4_q8_forward(uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t packed, int64_t packed_numel,
                        uintptr_t absmax, int64_t absmax_numel, uintptr_t code8, int64_t N, int64_t blocksize,
                        uintptr_t bias, int64_t bias_numel, uintptr_t y, int64_t ldy, int nthreads) {
  const CheckedWeight cw = check_weight(packed, packed_numel, absmax, absmax_numel, code8, N, K, blocksize, 4);
  check_q8(code8, blocksize, N * K > 0);
  check_forward_io(x, M, K, ldx, bias, bias_numel, y, N, ldy, cw);
  if (M == 0 || N == 0) return;
  const qk::Weight4Q8 w{cw.w.packed, cw.w.absmax, reinterpret_cast<const int8_t*>(code8), N, K, blocksize};
  qk::linear4_q8_forward(reinterpret_cast<const float*>(x), M, ldx, w,
                         bias ? reinterpret_cast<const float*>(bias) : nullptr, reinterpret_cast<float*>(y), ldy,
                         nthreads < 1 ? 1 : nthreads);
}

void require_repack_shape(int64_t N, int64_t K, int64_t blocksize) {
  QK_REQUIRE(N >= 0 && K >= 0 && qk::linear4_q8_repack_shape_ok(K, blocksize),
             "the repacked layout needs K a multiple of blocksize and blocksize a multiple of 16 (at most 65536), "
             "got N=" + s(N) +
                 ", K=" + s(K) + ", blocksize=" + s(blocksize));
}

int64_t linear4_q8_repacked_bytes(int64_t N, int64_t K, int64_t blocksize) {
  require_repack_shape(N, K, blocksize);
  mul_checked(N, K, "N*K");
  return qk::linear4_q8_repacked_bytes(N, K, blocksize);
}

void linear4_q8_repack(uintptr_t packed, int64_t packed_numel, int64_t N, int64_t K, int64_t blocksize, uintptr_t out,
                       int64_t out_numel, int nthreads) {
  require_repack_shape(N, K, blocksize);
  QK_REQUIRE(packed_numel == mul_checked(N, K, "N*K") / 2, "packed has " + s(packed_numel) + " bytes, but a [" + s(N) +
                                                               ", " + s(K) + "] weight needs " + s(N * K / 2));
  const int64_t need = qk::linear4_q8_repacked_bytes(N, K, blocksize);
  QK_REQUIRE(out_numel == need, "out has " + s(out_numel) + " bytes, the repacked weight needs " + s(need));
  QK_REQUIRE((packed != 0 && out != 0) || N * K == 0, "null data pointer");
  const Extent ep{packed, packed + static_cast<uintptr_t>(packed_numel)}, eo{out, out + static_cast<uintptr_t>(out_numel)};
  check_output(eo, "out", {{ep, "packed"}});
  if (N * K == 0) return;
  qk::linear4_q8_repack(reinterpret_cast<const uint8_t*>(packed), N, K, blocksize, reinterpret_cast<uint8_t*>(out),
                        nthreads < 1 ? 1 : nthreads);
}

// The one-row int8 forward on a repacked weight (linear4_q8.h): the checks of
// linear4_q8_forward, with the repacked bytes in place of packed.
void linear4_q8_forward_repacked(uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t repacked,
                                 int64_t repacked_numel, uintptr_t absmax, int64_t absmax_numel, uintptr_t code8,
                                 int64_t N, int64_t blocksize, uintptr_t bias, int64_t bias_numel, uintptr_t y, int64_t ldy, int nthreads) {
  QK_REQUIRE(linear4_q8_repacked_fits_ok(N, K, blocksize), "no repacked int8 kernel for N=" + s(N) + ", K=" + s(K) +
                                                               ", blocksize=" + s(blocksize) + " on this CPU");
  const int64_t need = linear4_q8_repacked_bytes(N, K, blocksize);
  QK_REQUIRE(repacked_numel == need, "repacked has " + s(repacked_numel) + " bytes, but a [" + s(N) + ", " + s(K) +
                                         "] weight needs " + s(need));
  // check_weight sizes packed as N*K / 2 bytes; the repacked extent replaces it.
  CheckedWeight cw = check_weight(repacked, N * K / 2, absmax, absmax_numel, code8, N, K, blocksize, 4);
  check_q8(code8, blocksize, N * K > 0);
  if (N * K > 0) cw.packed = {repacked, repacked + static_cast<uintptr_t>(repacked_numel)};
  check_forward_io(x, M, K, ldx, bias, bias_numel, y, N, ldy, cw);
  if (M == 0 || N == 0) return;
  const qk::Weight4Q8 w{nullptr, cw.w.absmax, reinterpret_cast<const int8_t*>(code8), N, K, blocksize};
  qk::linear4_q8_forward_repacked(reinterpret_cast<const float*>(x), M, ldx, reinterpret_cast<const uint8_t*>(repacked),
                                  w, bias ? reinterpret_cast<const float*>(bias) : nullptr, reinterpret_cast<float*>(y),
                                  ldy, nthreads < 1 ? 1 : nthreads);
}

const char* linear4_q8_plan(int64_t N, int64_t K, int64_t blocksize) {
  QK_REQUIRE(blocksize >= 2 && blocksize % 2 == 0, "blocksize must be a positive even number, got " + s(blocksize));
  return qk::linear4_q8_plan(qk::Weight4Q8{nullptr, nullptr, nullptr, N, K, blocksize});
}

qk::DenseWeight check_dense(uintptr_t w, int64_t N, int64_t K, int64_t ldw, Extent& ew) {
  QK_REQUIRE(N >= 0 && K >= 0, "N and K must be >= 0, got N=" + s(N) + ", K=" + s(K));
  QK_REQUIRE(ldw >= K && ldw >= 1, "ldw (row stride of W) must be >= K=" + s(K) + ", got " + s(ldw));
  ew = matrix_extent(w, N, K, ldw, "W");
  return {reinterpret_cast<const float*>(w), N, K, ldw};
}

void dense_forward(uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t w, int64_t N, int64_t ldw,
                   uintptr_t bias, int64_t bias_numel, uintptr_t y, int64_t ldy, int nthreads) {
  QK_REQUIRE(M >= 0, "M must be >= 0, got " + s(M));
  Extent ew;
  const qk::DenseWeight dw = check_dense(w, N, K, ldw, ew);
  QK_REQUIRE(ldx >= K && ldx >= 1, "ldx (row stride of x) must be >= K=" + s(K) + ", got " + s(ldx));
  QK_REQUIRE(ldy >= N && ldy >= 1, "ldy (row stride of y) must be >= N=" + s(N) + ", got " + s(ldy));
  const Extent ex = matrix_extent(x, M, K, ldx, "x");
  const Extent ey = matrix_extent(y, M, N, ldy, "y");
  const Extent eb = bias_extent(bias, bias_numel, N);
  check_output(ey, "y", {{ex, "x"}, {eb, "bias"}, {ew, "W"}});
  if (M == 0 || N == 0) return;
  qk::dense_kernels().forward(reinterpret_cast<const float*>(x), M, ldx, dw,
                              bias ? reinterpret_cast<const float*>(bias) : nullptr, reinterpret_cast<float*>(y), ldy,
                              nthreads < 1 ? 1 : nthreads);
}

void dense_backward_input(uintptr_t dy, int64_t M, int64_t N, int64_t lddy, uintptr_t w, int64_t K, int64_t ldw,
                          uintptr_t dx, int64_t lddx, int nthreads) {
  QK_REQUIRE(M >= 0, "M must be >= 0, got " + s(M));
  Extent ew;
  const qk::DenseWeight dw = check_dense(w, N, K, ldw, ew);
  QK_REQUIRE(lddy >= N && lddy >= 1, "lddy (row stride of dy) must be >= N=" + s(N) + ", got " + s(lddy));
  QK_REQUIRE(lddx >= K && lddx >= 1, "lddx (row stride of dx) must be >= K=" + s(K) + ", got " + s(lddx));
  const Extent edy = matrix_extent(dy, M, N, lddy, "dy");
  const Extent edx = matrix_extent(dx, M, K, lddx, "dx");
  check_output(edx, "dx", {{edy, "dy"}, {ew, "W"}});
  if (M == 0 || K == 0) return;
  qk::dense_kernels().backward_input(reinterpret_cast<const float*>(dy), M, lddy, dw, reinterpret_cast<float*>(dx),
                                     lddx, nthreads < 1 ? 1 : nthreads);
}

std::string linear4_plan(int64_t M, int64_t N, int64_t K, int64_t blocksize, bool backward) {
  QK_REQUIRE(M >= 0 && N >= 0 && K >= 0, "sizes must be >= 0");
  QK_REQUIRE(blocksize >= 2 && blocksize % 2 == 0, "blocksize must be a positive even number, got " + s(blocksize));
  const qk::Weight4 w{nullptr, nullptr, nullptr, N, K, blocksize};
  return qk::linear4_kernels().plan(M, w, backward);
}

// Tunings cross the boundary as dicts keyed by field name, so a caller cannot mix up the
// positions and an unknown key is an error naming it.
const char* const kTuningFields[] = {"kc", "nc", "mc", "gemv_rows_forward", "gemv_rows_backward", "gemv_decode"};

py::dict tuning_dict(const qk::Tuning& t) {
  const int64_t v[] = {t.kc, t.nc, t.mc, t.gemv_rows_forward, t.gemv_rows_backward, t.gemv_decode};
  py::dict d;
  for (int f = 0; f < 6; ++f) d[kTuningFields[f]] = v[f];
  return d;
}

void set_tuning(const std::string& isa, const py::dict& values) {
  qk::Tuning t = qk::tuning(qk::parse_isa(isa));
  int64_t* field[] = {&t.kc, &t.nc, &t.mc, &t.gemv_rows_forward, &t.gemv_rows_backward, &t.gemv_decode};
  for (const auto& item : values) {
    const std::string key = py::str(item.first);
    int f = 0;
    while (f < 6 && key != kTuningFields[f]) ++f;
    QK_REQUIRE(f < 6, "tuning: unknown field '" + key +
                          "'; fields: kc, nc, mc, gemv_rows_forward, gemv_rows_backward, gemv_decode");
    QK_REQUIRE(py::isinstance<py::int_>(item.second) && !py::isinstance<py::bool_>(item.second),
               "tuning: " + key + " must be an int");
    *field[f] = item.second.cast<int64_t>();
  }
  qk::set_tuning(qk::parse_isa(isa), t);
}

}  // namespace

void register_linear4(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("linear4_forward", &linear4_forward, nogil, py::arg("x_ptr"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("packed_ptr"), py::arg("packed_numel"), py::arg("absmax_ptr"), py::arg("absmax_numel"),
        py::arg("code_ptr"), py::arg("N"), py::arg("blocksize"), py::arg("bias_ptr"), py::arg("bias_numel"), py::arg("y_ptr"),
        py::arg("ldy"), py::arg("nthreads"),
        "Fused 4-bit linear: y[M, N] = x[M, K] @ Wd.T (+ bias[N] unless bias_ptr is 0), fp32, where "
        "Wd[n, k] = code[nibble(n*K + k)] * absmax[(n*K + k) // blocksize] (even flat index in the high "
        "nibble). x and y are row-major with row strides ldx >= K and ldy >= N (in elements). packed_numel "
        "must be (N*K + 1) // 2 and absmax_numel ceil(N*K / blocksize). Wd is never materialized; fp32 "
        "accumulation, |err| <= (K+2) * 2^-24 * (|x| @ |Wd|.T). y must not overlap any input.");
  m.def("lora4_forward", &lora4_forward, nogil, py::arg("x_ptr"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("noise_ptr"), py::arg("ldn"), py::arg("packed_ptr"), py::arg("packed_numel"), py::arg("absmax_ptr"),
        py::arg("absmax_numel"), py::arg("code_ptr"), py::arg("N"), py::arg("blocksize"), py::arg("bias_ptr"),
        py::arg("bias_numel"), py::arg("a_ptr"), py::arg("b_ptr"), py::arg("r"), py::arg("scaling"), py::arg("y_ptr"),
        py::arg("ldy"), py::arg("u_ptr"), py::arg("nthreads"),
        "QLoRA forward for few rows in one call (lora4.h): y = linear4_forward(x) + scaling * u @ B.T with "
        "u[M, r] = (x * noise) @ A.T (noise_ptr 0: x itself) written to u_ptr (0: not kept); A [r, K] and B [N, r] contiguous "
        "fp32. The base product uses nthreads, the rank-r products run on the calling thread.");
  m.def("linear4_backward_input", &linear4_backward_input, nogil, py::arg("dy_ptr"), py::arg("M"), py::arg("N"),
        py::arg("lddy"), py::arg("packed_ptr"), py::arg("packed_numel"), py::arg("absmax_ptr"),
        py::arg("absmax_numel"), py::arg("code_ptr"), py::arg("K"), py::arg("blocksize"), py::arg("dx_ptr"),
        py::arg("lddx"), py::arg("nthreads"),
        "Input gradient of the fused 4-bit linear: dx[M, K] = dy[M, N] @ Wd, fp32, for the same [N, K] "
        "weight layout as linear4_forward; row strides lddy >= N and lddx >= K. dx is overwritten and must "
        "not overlap any input. |err| <= (N+2) * 2^-24 * (|dy| @ |Wd|).");
  m.def("linear4_q8_forward", &linear4_q8_forward, nogil, py::arg("x_ptr"), py::arg("M"), py::arg("K"),
        py::arg("ldx"), py::arg("packed_ptr"), py::arg("packed_numel"), py::arg("absmax_ptr"),
        py::arg("absmax_numel"), py::arg("code8_ptr"), py::arg("N"), py::arg("blocksize"), py::arg("bias_ptr"),
        py::arg("bias_numel"), py::arg("y_ptr"), py::arg("ldy"), py::arg("nthreads"),
        "int8-compute 4-bit linear (opt-in, inference): as linear4_forward, but x is quantized to int8 per "
        "group of blocksize elements of each row and the codebook is the int8 table code8 (16 entries, "
        "rint(code * 127)); integer dot products per segment, scaled by absmax * sx in fp32 (csrc/linear4_q8.h).");
  m.def("linear4_q8_plan", &linear4_q8_plan, py::arg("N"), py::arg("K"), py::arg("blocksize"),
        "The path linear4_q8_forward takes for these sizes on the current ISA: 'avx512-vnni', 'avx2' or "
        "'scalar'.");
  m.def("linear4_q8_repacked_fits", &linear4_q8_repacked_fits_ok, py::arg("N"), py::arg("K"), py::arg("blocksize"),
        "Whether this CPU has the one-row int8 kernel on a repacked weight for these sizes (linear4_q8.h).");
  m.def(
      "linear4_q8_repacked_plan",
      [](int64_t N, int64_t K, int64_t blocksize) {
        return linear4_q8_repacked_fits_ok(N, K, blocksize) ? qk::linear4_q8_repacked_plan(N, K, blocksize) : "";
      },
      py::arg("N"), py::arg("K"), py::arg("blocksize"),
      "Which one-row int8 kernel on a repacked weight runs for these sizes on the current ISA: "
      "'avx512-vnni-repacked', 'avx2-repacked', or '' (none).");
  m.def("linear4_q8_repacked_bytes", &linear4_q8_repacked_bytes, py::arg("N"), py::arg("K"),
        py::arg("blocksize"), "Size in bytes of the repacked weight (rows padded to panels of 16 blocks); K must "
        "be a multiple of blocksize, blocksize a multiple of 16.");
  m.def("linear4_q8_repack", &linear4_q8_repack, nogil, py::arg("packed_ptr"), py::arg("packed_numel"), py::arg("N"),
        py::arg("K"), py::arg("blocksize"), py::arg("out_ptr"), py::arg("out_numel"), py::arg("nthreads"),
        "Writes the repacked layout of a [N, K] packed 4-bit weight (linear4_q8.h) into out.");
  m.def("linear4_q8_forward_repacked", &linear4_q8_forward_repacked, nogil, py::arg("x_ptr"), py::arg("M"),
        py::arg("K"), py::arg("ldx"), py::arg("repacked_ptr"), py::arg("repacked_numel"), py::arg("absmax_ptr"),
        py::arg("absmax_numel"), py::arg("code8_ptr"), py::arg("N"), py::arg("blocksize"), py::arg("bias_ptr"),
        py::arg("bias_numel"), py::arg("y_ptr"), py::arg("ldy"), py::arg("nthreads"),
        "linear4_q8_forward on the repacked weight (linear4_q8_repack): the same definition; every row of x "
        "streams the whole weight, so it is meant for M = 1.");
  m.def("dense_forward", &dense_forward, nogil, py::arg("x_ptr"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("w_ptr"), py::arg("N"), py::arg("ldw"), py::arg("bias_ptr"), py::arg("bias_numel"), py::arg("y_ptr"), py::arg("ldy"),
        py::arg("nthreads"),
        "Dense fp32 linear: y[M, N] = x[M, K] @ W[N, K].T (+ bias[N] unless bias_ptr is 0), row strides "
        "ldx >= K, ldw >= K, ldy >= N (elements); fp32 accumulation. y must not overlap any input.");
  m.def("dense_backward_input", &dense_backward_input, nogil, py::arg("dy_ptr"), py::arg("M"), py::arg("N"),
        py::arg("lddy"), py::arg("w_ptr"), py::arg("K"), py::arg("ldw"), py::arg("dx_ptr"), py::arg("lddx"),
        py::arg("nthreads"),
        "Input gradient of the dense fp32 linear: dx[M, K] = dy[M, N] @ W[N, K]; row strides lddy >= N, "
        "ldw >= K, lddx >= K. dx is overwritten and must not overlap any input.");
  m.def("linear4_plan", &linear4_plan, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("blocksize"),
        py::arg("backward") = false,
        "The code path the current ISA takes for these sizes: 'scalar', 'gemv' (streaming, few rows), "
        "'gemv-shuf' (AVX2 forward, byte-shuffle decoding, blocks of whole 64-element chunks), 'gemv-256' "
        "(AVX-512 build, rows of 64*odd elements) or 'gemm' (decoded panels + micro-kernel).");
  m.def("tuning", [](const std::string& isa) { return tuning_dict(qk::tuning(qk::parse_isa(isa))); }, py::arg("isa"),
        "The tuning the ISA path's fp32 kernels use now (csrc/tuning.h): cache blocking kc/nc/mc, the row "
        "counts up to which the streaming GEMV runs, and the AVX2 GEMV decoder (0 byte shuffle, 1 dword permute).");
  m.def("default_tuning", [](const std::string& isa) { return tuning_dict(qk::default_tuning(qk::parse_isa(isa))); },
        py::arg("isa"), "The built-in tuning of the ISA path (what an uncalibrated process uses).");
  m.def("set_tuning", &set_tuning, py::arg("isa"), py::arg("values"),
        "Sets some fields of the ISA path's tuning (a dict; the others keep their values). Every value only "
        "re-blocks the same products or picks another kernel: results stay within the fp32 bound.");
  m.def("linear4_peak_scratch_bytes", &qk::linear4_peak_scratch_bytes,
        "Largest scratch (bytes, summed over threads) any single linear4 call held at once since the last "
        "reset; it is sized by the cache blocking (and M*K for the few-row forward), never by N*K.");
  m.def("linear4_reset_peak_scratch", &qk::linear4_reset_peak_scratch, "Resets linear4_peak_scratch_bytes() to 0.");
}
