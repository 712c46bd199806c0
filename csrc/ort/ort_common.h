// What the ONNX Runtime operators of this library share (csrc/ort; docs/onnx.md, "The
// operator library"): ONNX Runtime's C API, the error type every failure becomes, input
// and output access, and the split of an operator's output rows over ONNX Runtime's own
// intra-op threads. Built against the C API headers of ONNX Runtime 1.21 (API version 21);
// ONNX Runtime serves every older API version, so the library loads into any runtime from
// 1.21 on. No ONNX Runtime library is linked.
#pragma once
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qk_ort {

// Set by RegisterCustomOps (the same table for every session of the process).
extern const OrtApi* g_api;

// Every failure inside an operator: an ONNX Runtime status naming the operator, the node
// and what was wrong (guarded() below), never an exception across the C boundary.
struct OpError {
  std::string msg;
};

std::string s(int64_t v);
void ok(const OrtApi& api, OrtStatus* st, const std::string& what);  // throws OpError if st is an error
int64_t attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name);
std::string node_name(const OrtApi& api, const OrtKernelInfo* info);

struct TensorView {
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
  int64_t numel;
};
TensorView view(const OrtApi& api, const OrtValue* v, const char* name);
std::string shape_str(const std::vector<int64_t>& shape);

template <class T>
const T* data(const OrtApi& api, const OrtValue* v) {
  void* p = nullptr;  // the 1.21 API has no const accessor; nothing is written through p
  ok(api, api.GetTensorMutableData(const_cast<OrtValue*>(v), &p), "could not read an input's data");
  return static_cast<const T*>(p);
}

// The call's inputs, all present: `what` names them for the error ("A, B, absmax, code").
std::vector<const OrtValue*> inputs(const OrtApi& api, OrtKernelContext* ctx, size_t n, const char* what);
// Output 0 with the shape of `a` but its last dimension n, as float.
float* output(const OrtApi& api, OrtKernelContext* ctx, const std::vector<int64_t>& a, int64_t n);

// The output rows [0, N) cut into slices for the threads: one per logical CPU (ONNX
// Runtime's default pool has a thread per core; a smaller pool takes several slices per
// thread), at most 16, none thinner than 64 rows, every cut at a multiple of `unit`. A
// kernel cannot ask ONNX Runtime for its pool's size, and more slices than threads cost:
// 8 slices on 2 threads ran a SmolLM2 decode step 7% slower than 2 (docs/onnx.md).
struct Slices {
  int64_t N, unit, count;
  Slices(int64_t N, int64_t unit);
  int64_t bound(int64_t t) const { return t == count ? N : (N * t / count) / unit * unit; }
  // Slice t's rows [first, second): what the run(task, t) callbacks below compute.
  std::pair<int64_t, int64_t> rows(size_t t) const {
    return {bound(static_cast<int64_t>(t)), bound(static_cast<int64_t>(t) + 1)};
  }
};
// run(task, t) for every slice t, on ONNX Runtime's intra-op threads: the library has no
// pool of its own (one pool in the process, no two pools spinning on the same cores).
void run_slices(const OrtApi& api, OrtKernelContext* ctx, const Slices& slices, void (*run)(void*, size_t),
                void* task);

// f() as an ONNX Runtime status: null, or the error prefixed with `who` ("qlora_kernels.Op node: ").
template <class F>
OrtStatusPtr guarded(const OrtApi& api, const std::string& who, F&& f) {
  try {
    f();
    return nullptr;
  } catch (const OpError& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, (who + e.msg).c_str());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_RUNTIME_EXCEPTION, (who + e.what()).c_str());
  }
}

// The operators, for RegisterCustomOps (objects that live as long as the process: sessions
// keep pointers to them, and ONNX Runtime never says when the last one is gone).
const OrtCustomOp* matmul4bit_op();
const OrtCustomOp* matmul4bit_int8_op();
const OrtCustomOp* linear_dense_op();

}  // namespace qk_ort
