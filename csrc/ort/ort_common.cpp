#include "ort_common.h"

#include <algorithm>
#include <mutex>
#include <string>
#include <thread>

namespace qk_ort {

const OrtApi* g_api = nullptr;

namespace {
constexpr int64_t kMaxSlices = 16;
constexpr int64_t kMinRowsPerSlice = 64;

int64_t slices_per_call() {
  static const int64_t n = std::max<int64_t>(1, std::min<int64_t>(kMaxSlices, std::thread::hardware_concurrency()));
  return n;
}
}  // namespace

std::string s(int64_t v) { return std::to_string(v); }

void ok(const OrtApi& api, OrtStatus* st, const std::string& what) {
  if (st == nullptr) return;
  std::string detail = api.GetErrorMessage(st);
  api.ReleaseStatus(st);
  throw OpError{what + " (" + detail + ")"};
}

int64_t attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  int64_t v = 0;
  ok(api, api.KernelInfoGetAttribute_int64(info, name, &v), std::string("attribute ") + name + " (int) is missing");
  return v;
}

std::string node_name(const OrtApi& api, const OrtKernelInfo* info) {
  std::string node;
  size_t len = 0;
  if (OrtStatus* st = api.KernelInfo_GetNodeName(info, nullptr, &len)) {
    api.ReleaseStatus(st);
  } else if (len > 1) {
    node.resize(len);
    if (OrtStatus* st2 = api.KernelInfo_GetNodeName(info, node.data(), &len)) api.ReleaseStatus(st2);
    node.resize(len > 0 ? len - 1 : 0);
  }
  return node;
}

TensorView view(const OrtApi& api, const OrtValue* v, const char* name) {
  const std::string what = std::string("input ") + name + " is not a tensor";
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ok(api, api.GetTensorTypeAndShape(v, &info), what);
  TensorView t{};
  size_t rank = 0;
  OrtStatus* st = api.GetTensorElementType(info, &t.type);
  if (st == nullptr) st = api.GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    t.shape.resize(rank);
    st = api.GetDimensions(info, t.shape.data(), rank);
  }
  api.ReleaseTensorTypeAndShapeInfo(info);
  ok(api, st, what);
  t.numel = 1;
  for (int64_t d : t.shape) t.numel *= d;
  return t;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string r = "[";
  for (size_t i = 0; i < shape.size(); ++i) r += (i ? ", " : "") + s(shape[i]);
  return r + "]";
}

std::vector<const OrtValue*> inputs(const OrtApi& api, OrtKernelContext* ctx, size_t n, const char* what) {
  size_t count = 0;
  ok(api, api.KernelContext_GetInputCount(ctx, &count), "could not count the inputs");
  if (count != n) throw OpError{"expects " + s(int64_t(n)) + " inputs (" + what + "), got " + s(int64_t(count))};
  std::vector<const OrtValue*> in(n, nullptr);
  for (size_t i = 0; i < n; ++i) {
    ok(api, api.KernelContext_GetInput(ctx, i, &in[i]), "could not read input " + s(int64_t(i)));
    if (in[i] == nullptr) throw OpError{"input " + s(int64_t(i)) + " is missing"};
  }
  return in;
}

float* output(const OrtApi& api, OrtKernelContext* ctx, const std::vector<int64_t>& a, int64_t n) {
  std::vector<int64_t> shape(a);
  shape.back() = n;
  OrtValue* out = nullptr;
  ok(api, api.KernelContext_GetOutput(ctx, 0, shape.data(), shape.size(), &out),
     "could not allocate the output " + shape_str(shape));
  void* y = nullptr;
  ok(api, api.GetTensorMutableData(out, &y), "could not write the output");
  return static_cast<float*>(y);
}

Slices::Slices(int64_t N, int64_t unit)
    : N(N), unit(unit), count(std::max<int64_t>(1, std::min<int64_t>(slices_per_call(),
                                                                     N / std::max(unit, kMinRowsPerSlice)))) {}

namespace {
// A slice's exception must not unwind through ONNX Runtime's pool: it turned the caller's
// part into an error status while the other threads still ran on the caller's stack (a bad
// QLORA_KERNELS_ISA, first read inside a slice: "stack smashing detected"). Each slice
// catches its own; the first message is raised on the caller's thread once all are done.
struct Guarded {
  void (*run)(void*, size_t);
  void* task;
  std::mutex mu;
  std::string first;
  bool failed = false;

  static void call(void* p, size_t t) {
    Guarded& g = *static_cast<Guarded*>(p);
    try {
      g.run(g.task, t);
    } catch (const OpError& e) {
      g.fail(e.msg);
    } catch (const std::exception& e) {
      g.fail(e.what());
    } catch (...) {
      g.fail("an unknown exception in a slice");
    }
  }
  void fail(const std::string& msg) {
    std::lock_guard<std::mutex> lock(mu);
    if (!failed) failed = true, first = msg;
  }
};
}  // namespace

void run_slices(const OrtApi& api, OrtKernelContext* ctx, const Slices& slices, void (*run)(void*, size_t),
                void* task) {
  if (slices.count == 1) {
    run(task, 0);
    return;
  }
  Guarded g{run, task, {}, {}, false};
  ok(api, api.KernelContext_ParallelFor(ctx, &Guarded::call, static_cast<size_t>(slices.count), 0, &g),
     "could not run on ONNX Runtime's threads");
  if (g.failed) throw OpError{g.first};
}

}  // namespace qk_ort
