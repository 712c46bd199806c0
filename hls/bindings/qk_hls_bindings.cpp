// pybind11 bindings of the C-simulated HLS kernels: the module qlora_kernels._hls behind
// the `hls` backend. Python passes raw data pointers (tensor.data_ptr()) and the element
// counts it allocated; sizes are re-checked here, because a wrong count is a heap
// overflow, not an exception. std::invalid_argument surfaces in Python as ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../host/qk_host.h"

namespace py = pybind11;

namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

std::string s(int64_t v) { return std::to_string(v); }

template <class T>
T* ptr(uintptr_t p, const char* name, int64_t count) {
  require(count == 0 || p != 0, std::string(name) + ": null data pointer");
  require(p % alignof(T) == 0, std::string(name) + ": misaligned data pointer");
  return reinterpret_cast<T*>(p);
}

// what: "A*B", the two sizes' names: a negative one is named itself, not as the product.
int64_t mul(int64_t a, int64_t b, const char* what) {
  const std::string w(what);
  const size_t star = w.find('*');
  require(a >= 0, w.substr(0, star) + " must be >= 0, got " + s(a));
  require(b >= 0, w.substr(star + 1) + " must be >= 0, got " + s(b));
  int64_t r;
  require(!__builtin_mul_overflow(a, b, &r) && r < (int64_t(1) << 40), w + " is too large");
  return r;
}

void check_blocksize(int64_t bs) {
  require(bs >= QK_GROUP_MIN && bs <= 4096 && (bs & (bs - 1)) == 0,
          "blocksize must be a power of two in [32, 4096], got " + s(bs));
}

void check_weight(int64_t N, int64_t K, int64_t bs, int64_t packed_numel, int64_t absmax_numel) {
  check_blocksize(bs);
  const int64_t n = mul(N, K, "N*K");
  require(packed_numel == (n + 1) / 2,
          "packed has " + s(packed_numel) + " bytes, but a [" + s(N) + ", " + s(K) + "] weight needs " + s((n + 1) / 2));
  require(absmax_numel == (n + bs - 1) / bs,
          "absmax has " + s(absmax_numel) + " entries, but the weight needs " + s((n + bs - 1) / bs));
}

void dequantize_4bit(uintptr_t packed, int64_t packed_numel, uintptr_t absmax, int64_t absmax_numel, uintptr_t code,
                     int64_t n, int64_t blocksize, uintptr_t out) {
  require(n >= 0, "n must be >= 0, got " + s(n));
  check_weight(1, n, blocksize, packed_numel, absmax_numel);
  qk_host::dequantize_4bit(ptr<const uint8_t>(packed, "packed", n), ptr<const float>(absmax, "absmax", n),
                           ptr<const float>(code, "code", n), n, blocksize, ptr<float>(out, "out", n));
}

void absmax_dq(uintptr_t q, int64_t n, uintptr_t absmax2, int64_t absmax2_numel, uintptr_t dmap, float offset,
               int64_t blocksize2, uintptr_t out) {
  require(blocksize2 >= 16 && blocksize2 % 16 == 0, "blocksize2 must be a positive multiple of 16");
  require(n >= 0 && absmax2_numel == (n + blocksize2 - 1) / blocksize2, "absmax2 size does not match n and blocksize2");
  qk_host::absmax_dq(ptr<const uint8_t>(q, "q", n), ptr<const float>(absmax2, "absmax2", n),
                     ptr<const float>(dmap, "dmap", n), offset, n, blocksize2, ptr<float>(out, "out", n));
}

void linear_4bit(uintptr_t x, int64_t M, int64_t K, uintptr_t packed, int64_t packed_numel, uintptr_t absmax,
                 int64_t absmax_numel, uintptr_t code, int64_t N, int64_t blocksize, uintptr_t bias, uintptr_t y) {
  check_weight(N, K, blocksize, packed_numel, absmax_numel);
  const int64_t mk = mul(M, K, "M*K"), mn = mul(M, N, "M*N");
  qk_host::linear_4bit(ptr<const float>(x, "x", mk), M, K, ptr<const uint8_t>(packed, "packed", N * K),
                       ptr<const float>(absmax, "absmax", N * K), ptr<const float>(code, "code", 1), N, blocksize,
                       bias ? ptr<const float>(bias, "bias", N) : nullptr, ptr<float>(y, "y", mn));
}

void linear_4bit_grad_input(uintptr_t dy, int64_t M, int64_t N, uintptr_t packed, int64_t packed_numel,
                            uintptr_t absmax, int64_t absmax_numel, uintptr_t code, int64_t K, int64_t blocksize,
                            uintptr_t dx) {
  check_weight(N, K, blocksize, packed_numel, absmax_numel);
  const int64_t mn = mul(M, N, "M*N"), mk = mul(M, K, "M*K");
  qk_host::linear_4bit_grad_input(ptr<const float>(dy, "dy", mn), M, N, ptr<const uint8_t>(packed, "packed", N * K),
                                  ptr<const float>(absmax, "absmax", N * K), ptr<const float>(code, "code", 1), K,
                                  blocksize, ptr<float>(dx, "dx", mk));
}

void gemv_bf16(uintptr_t w, int64_t N, int64_t K, uintptr_t x, uintptr_t y) {
  const int64_t nk = mul(N, K, "N*K");
  qk_host::gemv_bf16(ptr<const uint16_t>(w, "w", nk), N, K, ptr<const float>(x, "x", K), ptr<float>(y, "y", N));
}

void lora_down(uintptr_t x, int64_t M, int64_t K, uintptr_t a, int64_t r, uintptr_t u) {
  require(r >= 1 && r <= QK_LORA_MAX_R, "rank must be in [1, " + s(QK_LORA_MAX_R) + "], got " + s(r));
  qk_host::lora_down(ptr<const float>(x, "x", mul(M, K, "M*K")), M, K, ptr<const float>(a, "A", mul(r, K, "r*K")), r,
                     ptr<float>(u, "u", mul(M, r, "M*r")));
}

void lora_up(uintptr_t u, int64_t M, int64_t r, uintptr_t b, int64_t N, float scaling, uintptr_t y_in, uintptr_t y) {
  require(r >= 1 && r <= QK_LORA_MAX_R, "rank must be in [1, " + s(QK_LORA_MAX_R) + "], got " + s(r));
  const int64_t mn = mul(M, N, "M*N");
  qk_host::lora_up(ptr<const float>(u, "u", mul(M, r, "M*r")), M, r, ptr<const float>(b, "B", mul(N, r, "N*r")), N,
                   scaling, ptr<const float>(y_in, "y_in", mn), ptr<float>(y, "y", mn));
}

py::dict params() {
  py::dict d;
#define QK_PARAM(name) d[#name] = name
  QK_PARAM(QK_TARGET_CLOCK_MHZ);
  QK_PARAM(QK_WORD_BITS);
  QK_PARAM(QK_WORD_BYTES);
  QK_PARAM(QK_II);
  QK_PARAM(QK_LANES);
  QK_PARAM(QK_BYTE_LANES);
  QK_PARAM(QK_CODES);
  QK_PARAM(QK_PAIR_ENTRIES);
  QK_PARAM(QK_GROUP_MIN);
  QK_PARAM(QK_SCALE_SLOTS);
  QK_PARAM(QK_BUILD_MULS);
  QK_PARAM(QK_BUILD_ADDS);
  QK_PARAM(QK_BUILD_CYCLES);
  QK_PARAM(QK_GEMV_MAX_ROWS);
  QK_PARAM(QK_GEMV_MAX_TILES);
  QK_PARAM(QK_PREFETCH_BEATS);
  QK_PARAM(QK_BF16_LANES);
  QK_PARAM(QK_BF16_MANT);
  QK_PARAM(QK_BF16_BUILD_CYCLES);
  QK_PARAM(QK_GEMM_TM);
  QK_PARAM(QK_GEMM_MAX_ROWS);
  QK_PARAM(QK_GEMM_MAX_TILES);
  QK_PARAM(QK_DECODE_LANES);
  QK_PARAM(QK_LORA_LANES);
  QK_PARAM(QK_LORA_MAX_R);
  QK_PARAM(QK_LORA_TM);
#undef QK_PARAM
  return d;
}

}  // namespace

PYBIND11_MODULE(_hls, m) {
  m.doc() = "C-simulation of the qlora-kernels HLS kernels (hls/*.cpp), compiled with the host call sequences";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("params", &params, "The design parameters (hls/qk_hls_params.h) as compiled into this module.");
  m.def("dequantize_4bit", &dequantize_4bit, nogil,
        "qk_decode_4bit: out[i] = code[nibble i] * absmax[i / blocksize] in fp32, i < n.");
  m.def("absmax_dq", &absmax_dq, nogil, "qk_absmax_dq: out[i] = dmap[q[i]] * absmax2[i / blocksize2] + offset.");
  m.def("linear_4bit", &linear_4bit, nogil,
        "y[M, N] = x[M, K] W^T (+ bias): qk_gemv_4bit for M == 1, qk_gemm_4bit otherwise (fp32).");
  m.def("linear_4bit_grad_input", &linear_4bit_grad_input, nogil, "dx[M, K] = dy[M, N] W: qk_gemm_4bit_t (fp32).");
  m.def("gemv_bf16", &gemv_bf16, nogil,
        "qk_gemv_4bit in bf16 mode: y[N] = W x for a bf16 W [N, K] (raw 16-bit patterns).");
  m.def("lora_down", &lora_down, nogil, "qk_lora_down: u[M, r] = x[M, K] A[r, K]^T.");
  m.def("lora_up", &lora_up, nogil, "qk_lora_up: y[M, N] = y_in + scaling * u[M, r] B[N, r]^T.");
}
