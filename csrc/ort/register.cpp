// The library's entry points: RegisterCustomOps, which ONNX Runtime calls when it loads the
// library (SessionOptions.register_custom_ops_library, or GenAI's "custom_ops_library"),
// and the CPU-path hooks the tests and `qlora-kernels info` call through ctypes. Nothing
// else is exported (exports.map).
#include <cstdio>
#include <exception>

#include "../dispatch.h"
#include "ort_common.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // older than 1.21: ONNX Runtime reports the unknown op itself
  qk_ort::g_api = api;
  Ort::InitApi(api);
  // one domain for every session (a function-local static: sessions may register concurrently)
  static OrtCustomOpDomain* const domain = [api]() -> OrtCustomOpDomain* {
    OrtCustomOpDomain* d = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain("qlora_kernels", &d)) {
      api->ReleaseStatus(st);
      return nullptr;
    }
    for (const OrtCustomOp* op : {qk_ort::matmul4bit_op(), qk_ort::matmul4bit_int8_op(), qk_ort::linear_dense_op()}) {
      if (OrtStatus* st = api->CustomOpDomain_Add(d, op)) {
        api->ReleaseStatus(st);
        return nullptr;
      }
    }
    return d;
  }();
  if (domain == nullptr) return api->CreateStatus(ORT_FAIL, "qlora_kernels: could not create the custom op domain");
  return api->AddCustomOpDomain(options, domain);
}

// The CPU path the library's kernels take: the same choice and the same QLORA_KERNELS_ISA
// cap as the Python extension (dispatch.h), but this library's own copy of it. Returns 0,
// or -1 for a path this CPU or the cap refuses.
extern "C" __attribute__((visibility("default"))) int qlora_kernels_ort_set_isa(const char* name) {
  try {
    qk::set_isa(name);
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}

// The path's name, or "error: ..." when the QLORA_KERNELS_ISA cap is invalid (its first
// read throws): an exception must not cross the C boundary (std::terminate, the process
// gone) where the Python extension raises a ValueError.
// The message lives in a plain char buffer: a thread_local std::string needs glibc 2.18's
// __cxa_thread_atexit_impl, which moved the wheel from manylinux_2_17 to manylinux_2_24.
extern "C" __attribute__((visibility("default"))) const char* qlora_kernels_ort_isa() {
  static thread_local char err[512];
  try {
    return qk::isa_name(qk::current_isa());
  } catch (const std::exception& e) {
    std::snprintf(err, sizeof err, "error: %s", e.what());
    return err;
  }
}
