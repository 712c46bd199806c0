// pybind11 bindings of the torch-free kernels. Python passes raw data pointers
// (tensor.data_ptr()) with the element counts it allocated; the C++ side re-checks
// every size it relies on, because a wrong count here is a heap overflow, not an
// exception. std::invalid_argument surfaces in Python as ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "dispatch.h"
#include "require.h"
#include "quant4.h"

namespace py = pybind11;

// Each op family binds itself (one file per op); they are listed here.
void register_linear4(py::module_& m);
void register_adamw(py::module_& m);
void register_peak(py::module_& m);
void register_norm_act(py::module_& m);
void register_attention(py::module_& m);
void register_lora_rows(py::module_& m);
void register_decode(py::module_& m);
void register_dropout(py::module_& m);
void register_rope(py::module_& m);

namespace {

// A fresh multi-MB torch tensor is untouched memory: first-touch page faults cost more
// than decoding into it. Asking for transparent huge pages (as torch does under
// THP_MEM_ALLOC_ENABLE) cuts the faults 512-fold; it is advice, never an error.
void advise_hugepages(uintptr_t p, int64_t bytes) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < int64_t(kHuge) * 2) return;
  const uintptr_t start = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

void check_blocksize(int64_t blocksize) {
  QK_REQUIRE(blocksize >= 2 && blocksize % 2 == 0, "blocksize must be a positive even number, got " + std::to_string(blocksize));
}

qk::DType dtype_of(int code, const char* what) {
  QK_REQUIRE(code >= 0 && code <= 2, std::string(what) + ": unsupported dtype code " + std::to_string(code));
  return static_cast<qk::DType>(code);
}

int64_t quantize_4bit(uintptr_t x, int x_dtype, int64_t n, int64_t blocksize, uintptr_t code,
                      uintptr_t bounds, uintptr_t order, uintptr_t packed, int64_t packed_numel,
                      uintptr_t absmax, int64_t absmax_numel, int nthreads) {
  check_blocksize(blocksize);
  QK_REQUIRE(n >= 0, "n must be >= 0");
  QK_REQUIRE(packed_numel == qk::packed_bytes(n), "packed has " + std::to_string(packed_numel) + " bytes, expected " + std::to_string(qk::packed_bytes(n)));
  QK_REQUIRE(absmax_numel == qk::block_count(n, blocksize), "absmax has " + std::to_string(absmax_numel) + " entries, expected " + std::to_string(qk::block_count(n, blocksize)));
  if (n == 0) return -1;
  QK_REQUIRE(x && code && bounds && order && packed && absmax, "null data pointer");
  const qk::Quant4Tables t{ptr<const float>(code), ptr<const float>(bounds), ptr<const uint8_t>(order)};
  return qk::kernels().quantize4(ptr<const void>(x), dtype_of(x_dtype, "W"), n, blocksize, t,
                                 ptr<uint8_t>(packed), ptr<float>(absmax), nthreads < 1 ? 1 : nthreads);
}

void dequantize_4bit(uintptr_t packed, int64_t packed_numel, uintptr_t absmax, int64_t absmax_numel,
                     uintptr_t code, int64_t n, int64_t blocksize, uintptr_t out, int out_dtype, int nthreads) {
  check_blocksize(blocksize);
  QK_REQUIRE(n >= 0, "n must be >= 0");
  QK_REQUIRE(packed_numel == qk::packed_bytes(n), "packed has " + std::to_string(packed_numel) + " bytes, but the state's shape needs " + std::to_string(qk::packed_bytes(n)));
  QK_REQUIRE(absmax_numel == qk::block_count(n, blocksize), "absmax has " + std::to_string(absmax_numel) + " entries, but the state needs " + std::to_string(qk::block_count(n, blocksize)));
  if (n == 0) return;
  QK_REQUIRE(packed && absmax && code && out, "null data pointer");
  const qk::DType ot = dtype_of(out_dtype, "dtype");
  advise_hugepages(out, n * (ot == qk::DType::F32 ? 4 : 2));
  qk::kernels().dequantize4(ptr<const uint8_t>(packed), ptr<const float>(absmax), ptr<const float>(code), n,
                            blocksize, ptr<void>(out), ot, nthreads < 1 ? 1 : nthreads);
}

// The 8-bit map comes from the caller's state (state2.code of a double-quantized state):
// it must have its 256 entries, or the decode reads past it.
void check_8bit(int64_t n, int64_t blocksize, int64_t code_numel, int64_t absmax_numel) {
  QK_REQUIRE(blocksize >= 1, "blocksize must be positive, got " + std::to_string(blocksize));
  QK_REQUIRE(n >= 0, "n must be >= 0");
  QK_REQUIRE(code_numel == 256, "code has " + std::to_string(code_numel) + " entries; the 8-bit map needs 256");
  QK_REQUIRE(absmax_numel == qk::block_count(n, blocksize),
             "absmax has " + std::to_string(absmax_numel) + " entries, but " + std::to_string(n) +
                 " values with blocksize " + std::to_string(blocksize) + " need " +
                 std::to_string(qk::block_count(n, blocksize)));
}

void quantize_8bit(uintptr_t x, int64_t n, int64_t blocksize, uintptr_t code, int64_t code_numel, uintptr_t out,
                   uintptr_t absmax, int64_t absmax_numel) {
  check_8bit(n, blocksize, code_numel, absmax_numel);
  if (n == 0) return;
  QK_REQUIRE(x && code && out && absmax, "null data pointer");
  qk::quantize8_blockwise(ptr<const float>(x), n, blocksize, ptr<const float>(code), ptr<uint8_t>(out), ptr<float>(absmax));
}

void dequantize_8bit(uintptr_t q, uintptr_t absmax, int64_t absmax_numel, uintptr_t code, int64_t code_numel, int64_t n,
                     int64_t blocksize, uintptr_t out) {
  check_8bit(n, blocksize, code_numel, absmax_numel);
  if (n == 0) return;
  QK_REQUIRE(q && absmax && code && out, "null data pointer");
  qk::dequantize8_blockwise(ptr<const uint8_t>(q), ptr<const float>(absmax), ptr<const float>(code), n, blocksize, ptr<float>(out));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qlora-kernels CPU kernels (torch-free C++; pointers come from torch tensors in Python)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("quantize_4bit", &quantize_4bit, nogil,
        "Blockwise 4-bit quantization of n elements (dtype code 0=f32, 1=bf16, 2=f16). Writes "
        "(n+1)/2 packed bytes (even element in the high nibble) and ceil(n/blocksize) absmax; "
        "returns -1 or the first block holding NaN/Inf.");
  m.def("dequantize_4bit", &dequantize_4bit, nogil,
        "Blockwise 4-bit dequantization: out[i] = code[nibble(i)] * absmax[i / blocksize], "
        "computed in fp32 and rounded to the output dtype (0=f32, 1=bf16, 2=f16).");
  m.def("quantize_8bit", &quantize_8bit, nogil, py::arg("x_ptr"), py::arg("n"), py::arg("blocksize"),
        py::arg("code_ptr"), py::arg("code_numel"), py::arg("out_ptr"), py::arg("absmax_ptr"), py::arg("absmax_numel"),
        "8-bit blockwise quantization with a sorted 256-entry map (fp32 in).");
  m.def("dequantize_8bit", &dequantize_8bit, nogil, py::arg("q_ptr"), py::arg("absmax_ptr"), py::arg("absmax_numel"),
        py::arg("code_ptr"), py::arg("code_numel"), py::arg("n"), py::arg("blocksize"), py::arg("out_ptr"),
        "8-bit blockwise dequantization to fp32 (code: the 256-entry map).");
  register_linear4(m);
  register_adamw(m);
  register_peak(m);
  register_norm_act(m);
  register_attention(m);
  register_lora_rows(m);
  register_decode(m);
  register_dropout(m);
  register_rope(m);
  m.def("compiled_isas", &qk::compiled_isas, "ISA paths compiled into this build.");
  m.def("supported_isas", &qk::supported_isas, "ISA paths this CPU can run.");
  m.def("best_isa", &qk::best_isa, "The path cpuid selects.");
  m.def("get_isa", [] { return std::string(qk::isa_name(qk::current_isa())); }, "The path in use.");
  m.def("set_isa", &qk::set_isa, "Force a path ('scalar', 'avx2', 'avx512').");
  m.def("openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the extension was built with OpenMP.");
  // The bitsandbytes plugin's check that a cached decode still matches its inputs, at every
  // one-row call: torch.equal and numpy took 7-60 us for a 4096 x 4096 weight's 8-bit absmax.
  m.def("same_bytes", [](uintptr_t a, uintptr_t b, int64_t nbytes) {
    QK_REQUIRE(nbytes >= 0, "nbytes must be >= 0");
    QK_REQUIRE(nbytes == 0 || (a && b), "null data pointer");
    return nbytes == 0 || std::memcmp(reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b),
                                      static_cast<size_t>(nbytes)) == 0;
  }, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("nbytes"), "Whether two buffers hold the same bytes.");
}
