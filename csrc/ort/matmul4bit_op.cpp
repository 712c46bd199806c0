// ONNX Runtime custom operator library: the fused 4-bit linear (linear4.h) as ONNX Runtime
// CPU kernels, so that an exported model keeps the exact NF4/FP4 bytes of the fine-tuned
// base and still computes at our kernels' speed. ONNX Runtime's own com.microsoft.
// MatMulBnb4 reads the same bytes but dequantizes the whole weight into a temporary fp32
// matrix on every call (docs/onnx.md).
//
//   qlora_kernels.MatMul4bit      Y[..., N] = A[..., K] @ dequant(B)^T, fp32 compute
//   qlora_kernels.MatMul4bitInt8  the same with int8 activations (linear4_q8.h)
//   inputs:  A float [..., K]; B uint8 [(N*K+1)/2] (our packed layout = MatMulBnb4's);
//            absmax float [ceil(N*K/block_size)]; code [16], float (MatMul4bit) or int8
//            (MatMul4bitInt8): the codebook, index = nibble, written by the exporter from
//            qlora_kernels.formats (no copy of a codebook here)
//   attributes: K, N, block_size (int)
//
// Loaded by ONNX Runtime (SessionOptions.register_custom_ops_library, or GenAI's
// "custom_ops_library"), which calls RegisterCustomOps. Built against the C API headers
// of ONNX Runtime 1.21 (API version 21); ONNX Runtime serves every older API version, so
// the library loads into any runtime from 1.21 on. No ONNX Runtime library is linked.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "../dense.h"
#include "../dispatch.h"
#include "../linear4.h"
#include "../linear4_q8.h"

namespace {

int64_t gcd(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

const char* const kDomain = "qlora_kernels";
// Row slices per call: one per logical CPU (ONNX Runtime's default pool has a thread per
// core; a smaller pool takes several slices per thread), at most 16, none thinner than 64
// rows. A kernel cannot ask ONNX Runtime for its pool's size, and more slices than threads
// cost: 8 slices on 2 threads ran a SmolLM2 decode step 7% slower than 2 (docs/onnx.md).
constexpr int64_t kMaxTasks = 16;
constexpr int64_t kMinRowsPerTask = 64;

int64_t slices_per_call() {
  static const int64_t n = std::max<int64_t>(1, std::min<int64_t>(kMaxTasks, std::thread::hardware_concurrency()));
  return n;
}

// Set by RegisterCustomOps (the same table for every session of the process).
const OrtApi* g_api = nullptr;

std::string s(int64_t v) { return std::to_string(v); }

// Every error leaves the kernel as an ONNX Runtime status naming the op and the node.
struct OpError {
  std::string msg;
};

// A failed ONNX Runtime call, as an OpError saying what could not be done.
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

struct TensorView {
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
  int64_t numel;
};

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

template <class T>
const T* data(const OrtApi& api, const OrtValue* v) {
  void* p = nullptr;  // the 1.21 API has no const accessor; nothing is written through p
  ok(api, api.GetTensorMutableData(const_cast<OrtValue*>(v), &p), "could not read an input's data");
  return static_cast<const T*>(p);
}

// The two operators: fp32 compute (the bits of qlora_kernels::linear_4bit) and int8
// compute (those of linear_4bit_int8, compute="int8": linear4_q8.h; ONNX Runtime's
// MatMulNBits accuracy_level 4 is the same idea), whose codebook input is the int8 one.
enum class Compute { Fp32, Int8 };

const char* op_name(Compute c) { return c == Compute::Fp32 ? "MatMul4bit" : "MatMul4bitInt8"; }

struct AlignedBytes {  // the repacked weight: 64-byte aligned, as the kernel's loads want
  uint8_t* p = nullptr;
  explicit AlignedBytes(int64_t n) : p(static_cast<uint8_t*>(std::aligned_alloc(64, (n + 63) / 64 * 64))) {
    if (p == nullptr) throw std::bad_alloc();
  }
  ~AlignedBytes() { std::free(p); }
  AlignedBytes(const AlignedBytes&) = delete;
  AlignedBytes& operator=(const AlignedBytes&) = delete;
};

struct MatMul4bitKernel {
  Compute compute_type;
  int64_t K, N, block_size;
  std::string node;
  // Int8 on a constant weight: the one-row VNNI kernel's layout of it, made once here (as
  // ONNX Runtime prepacks MatMulNBits weights), where this CPU has that kernel.
  std::unique_ptr<AlignedBytes> repacked;
  const uint8_t* repacked_from = nullptr;  // the constant's data: used only while the input is that very tensor
  int64_t repacked_row = 0;

  MatMul4bitKernel(const OrtApi& api, const OrtKernelInfo* info, Compute c) : compute_type(c) {
    K = attribute(api, info, "K");
    N = attribute(api, info, "N");
    block_size = attribute(api, info, "block_size");
    if (K < 1 || N < 1) throw OpError{"K and N must be >= 1, got K=" + s(K) + ", N=" + s(N)};
    if (block_size < 2 || block_size % 2 != 0 || block_size > (int64_t(1) << 30))
      throw OpError{"block_size must be a positive even number, got " + s(block_size)};
    if (K > (int64_t(1) << 40) / N) throw OpError{"N*K is too large"};
    size_t len = 0;
    if (OrtStatus* st = api.KernelInfo_GetNodeName(info, nullptr, &len)) {
      api.ReleaseStatus(st);
    } else if (len > 1) {
      node.resize(len);
      if (OrtStatus* st2 = api.KernelInfo_GetNodeName(info, node.data(), &len)) api.ReleaseStatus(st2);
      node.resize(len > 0 ? len - 1 : 0);
    }
    if (c == Compute::Int8 && qk::linear4_q8_repacked_fits(N, K, block_size)) {
      int is_constant = 0;
      const OrtValue* b = nullptr;
      OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &b);
      if (st != nullptr) {
        api.ReleaseStatus(st);
      } else if (is_constant && b != nullptr && view(api, b, "B").numel == (N * K + 1) / 2) {
        const int64_t bytes = qk::linear4_q8_repacked_bytes(N, K, block_size);
        repacked = std::make_unique<AlignedBytes>(bytes);
        repacked_from = data<uint8_t>(api, b);
        qk::linear4_q8_repack(repacked_from, N, K, block_size, repacked->p, 1);
        repacked_row = bytes / N;
      }
    }
  }

  void compute(OrtKernelContext* ctx) const {
    const OrtApi& api = *g_api;
    const OrtValue* in[4] = {};
    size_t count = 0;
    ok(api, api.KernelContext_GetInputCount(ctx, &count), "could not count the inputs");
    if (count != 4) throw OpError{"expects 4 inputs (A, B, absmax, code), got " + s(int64_t(count))};
    for (size_t i = 0; i < 4; ++i) {
      ok(api, api.KernelContext_GetInput(ctx, i, &in[i]), "could not read input " + s(int64_t(i)));
      if (in[i] == nullptr) throw OpError{"input " + s(int64_t(i)) + " is missing"};
    }
    const TensorView a = view(api, in[0], "A"), b = view(api, in[1], "B"), am = view(api, in[2], "absmax"),
                     code = view(api, in[3], "code");
    const bool int8 = compute_type == Compute::Int8;
    if (a.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError{"input A must be float"};
    if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) throw OpError{"input B must be uint8"};
    if (am.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError{"input absmax must be float"};
    if (code.type != (int8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) ||
        code.numel != 16)
      throw OpError{std::string("input code must be 16 ") + (int8 ? "int8" : "float") + " values, got " +
                    shape_str(code.shape)};
    if (a.shape.empty() || a.shape.back() != K)
      throw OpError{"input A must be [..., K=" + s(K) + "], got " + shape_str(a.shape)};
    const int64_t n = N * K;
    if (b.numel != (n + 1) / 2)
      throw OpError{"input B has " + s(b.numel) + " bytes, a [" + s(N) + ", " + s(K) + "] weight needs " +
                    s((n + 1) / 2)};
    const int64_t blocks = (n + block_size - 1) / block_size;
    if (am.numel != blocks)
      throw OpError{"input absmax has " + s(am.numel) + " entries, a [" + s(N) + ", " + s(K) +
                    "] weight with block_size " + s(block_size) + " needs " + s(blocks)};

    std::vector<int64_t> out_shape(a.shape);
    out_shape.back() = N;
    OrtValue* out = nullptr;
    ok(api, api.KernelContext_GetOutput(ctx, 0, out_shape.data(), out_shape.size(), &out),
       "could not allocate the output " + shape_str(out_shape));
    void* y = nullptr;
    ok(api, api.GetTensorMutableData(out, &y), "could not write the output");
    const int64_t M = a.numel / K;
    if (M == 0) return;
    // The work is split by output rows over ONNX Runtime's own intra-op threads (this
    // library has no thread pool of its own: one pool in the process, no two pools spinning
    // against each other on the same cores). A slice of rows [n0, n1) is itself a packed
    // weight when n0*K falls on a block boundary: rows are cut at multiples of `unit`.
    struct Task {
      const float* x;
      int64_t M, K, N, block_size, unit, tasks;
      const uint8_t* packed;
      const float* absmax;
      const void* code;
      float* y;
      const uint8_t* repacked;  // int8 one-row layout, or null
      int64_t repacked_row;
      int64_t bound(int64_t t) const { return t == tasks ? N : (N * t / tasks) / unit * unit; }
    };
    const int64_t unit = block_size / gcd(K, block_size);
    const uint8_t* packed = data<uint8_t>(api, in[1]);
    // the repacked copy serves one-row calls on the constant it was made from, on a CPU
    // path that has its kernel (the tests switch paths at run time)
    const bool use_repacked = int8 && M == 1 && repacked && packed == repacked_from &&
                              qk::linear4_q8_repacked_fits(N, K, block_size);
    Task task{data<float>(api, in[0]), M, K, N, block_size, unit, 1, packed, data<float>(api, in[2]),
              int8 ? static_cast<const void*>(data<int8_t>(api, in[3])) : data<float>(api, in[3]),
              static_cast<float*>(y), use_repacked ? repacked->p : nullptr, repacked_row};
    task.tasks = std::max<int64_t>(1, std::min<int64_t>(slices_per_call(), N / std::max(unit, kMinRowsPerTask)));
    auto run_fp32 = [](void* p, size_t t) {
      const Task& k = *static_cast<const Task*>(p);
      const int64_t n0 = k.bound(static_cast<int64_t>(t)), n1 = k.bound(static_cast<int64_t>(t) + 1);
      if (n1 <= n0) return;
      const int64_t i0 = n0 * k.K;  // a multiple of block_size, so even
      const qk::Weight4 w{k.packed + i0 / 2, k.absmax + i0 / k.block_size, static_cast<const float*>(k.code),
                          n1 - n0, k.K, k.block_size};
      qk::linear4_kernels().forward(k.x, k.M, k.K, w, nullptr, k.y + n0, k.N, 1);
    };
    auto run_int8 = [](void* p, size_t t) {
      const Task& k = *static_cast<const Task*>(p);
      const int64_t n0 = k.bound(static_cast<int64_t>(t)), n1 = k.bound(static_cast<int64_t>(t) + 1);
      if (n1 <= n0) return;
      const int64_t i0 = n0 * k.K;
      const qk::Weight4Q8 w{k.packed + i0 / 2, k.absmax + i0 / k.block_size, static_cast<const int8_t*>(k.code),
                            n1 - n0, k.K, k.block_size};
      if (k.repacked != nullptr)  // rows of whole blocks here (the repack's shape rule): one row's bytes apiece
        qk::linear4_q8_forward_repacked(k.x, k.M, k.K, k.repacked + n0 * k.repacked_row, w, nullptr, k.y + n0, k.N,
                                        1);
      else
        qk::linear4_q8_forward(k.x, k.M, k.K, w, nullptr, k.y + n0, k.N, 1);
    };
    void (*run)(void*, size_t) = int8 ? static_cast<void (*)(void*, size_t)>(run_int8) : run_fp32;
    if (task.tasks == 1) {
      run(&task, 0);
    } else {
      ok(api, api.KernelContext_ParallelFor(ctx, run, static_cast<size_t>(task.tasks), 0, &task),
         "could not run on ONNX Runtime's threads");
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    try {
      compute(ctx);
      return nullptr;
    } catch (const OpError& e) {
      return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (prefix() + e.msg).c_str());
    } catch (const std::exception& e) {
      return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, (prefix() + e.what()).c_str());
    }
  }

  std::string prefix() const {
    return std::string("qlora_kernels.") + op_name(compute_type) + " " + node + ": ";
  }
};

struct MatMul4bitOp : Ort::CustomOpBase<MatMul4bitOp, MatMul4bitKernel, true> {
  Compute compute_type;
  explicit MatMul4bitOp(Compute c) : compute_type(c) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    const std::string prefix = std::string("qlora_kernels.") + op_name(compute_type) + ": ";
    try {
      *kernel = new MatMul4bitKernel(api, info, compute_type);
      return nullptr;
    } catch (const OpError& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (prefix + e.msg).c_str());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_RUNTIME_EXCEPTION, (prefix + e.what()).c_str());
    }
  }
  const char* GetName() const { return op_name(compute_type); }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (i == 3 && compute_type == Compute::Int8) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// qlora_kernels.LinearDense: Y[..., N] = A[..., K] @ W^T for a dense fp32 W [N, K] (a
// decoder's tied output head: ONNX Runtime's Gemm(transB=1) on the embedding table). Our
// dense kernel (dense.h) streams W once at one row; rows are split as above, at any row.
struct LinearDenseKernel {
  std::string node;

  LinearDenseKernel(const OrtApi& api, const OrtKernelInfo* info) {
    size_t len = 0;
    if (OrtStatus* st = api.KernelInfo_GetNodeName(info, nullptr, &len)) {
      api.ReleaseStatus(st);
    } else if (len > 1) {
      node.resize(len);
      if (OrtStatus* st2 = api.KernelInfo_GetNodeName(info, node.data(), &len)) api.ReleaseStatus(st2);
      node.resize(len > 0 ? len - 1 : 0);
    }
  }

  void compute(OrtKernelContext* ctx) const {
    const OrtApi& api = *g_api;
    const OrtValue* in[2] = {};
    size_t count = 0;
    ok(api, api.KernelContext_GetInputCount(ctx, &count), "could not count the inputs");
    if (count != 2) throw OpError{"expects 2 inputs (A, W), got " + s(int64_t(count))};
    for (size_t i = 0; i < 2; ++i) {
      ok(api, api.KernelContext_GetInput(ctx, i, &in[i]), "could not read input " + s(int64_t(i)));
      if (in[i] == nullptr) throw OpError{"input " + s(int64_t(i)) + " is missing"};
    }
    const TensorView a = view(api, in[0], "A"), w = view(api, in[1], "W");
    if (a.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError{"input A must be float"};
    if (w.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || w.shape.size() != 2)
      throw OpError{"input W must be a float matrix [N, K], got " + shape_str(w.shape)};
    const int64_t N = w.shape[0], K = w.shape[1];
    if (a.shape.empty() || a.shape.back() != K)
      throw OpError{"input A must be [..., K=" + s(K) + "], got " + shape_str(a.shape)};
    std::vector<int64_t> out_shape(a.shape);
    out_shape.back() = N;
    OrtValue* out = nullptr;
    ok(api, api.KernelContext_GetOutput(ctx, 0, out_shape.data(), out_shape.size(), &out),
       "could not allocate the output " + shape_str(out_shape));
    void* y = nullptr;
    ok(api, api.GetTensorMutableData(out, &y), "could not write the output");
    const int64_t M = K > 0 ? a.numel / K : 0;
    if (M == 0 || N == 0) return;
    struct Task {
      const float *x, *w;
      int64_t M, K, N, tasks;
      float* y;
      int64_t bound(int64_t t) const { return t == tasks ? N : N * t / tasks; }
    };
    Task task{data<float>(api, in[0]), data<float>(api, in[1]), M, K, N, 1, static_cast<float*>(y)};
    task.tasks = std::max<int64_t>(1, std::min<int64_t>(slices_per_call(), N / kMinRowsPerTask));
    auto run = [](void* p, size_t t) {
      const Task& k = *static_cast<const Task*>(p);
      const int64_t n0 = k.bound(static_cast<int64_t>(t)), n1 = k.bound(static_cast<int64_t>(t) + 1);
      if (n1 <= n0) return;
      const qk::DenseWeight w{k.w + n0 * k.K, n1 - n0, k.K, k.K};
      qk::dense_kernels().forward(k.x, k.M, k.K, w, nullptr, k.y + n0, k.N, 1);
    };
    if (task.tasks == 1 || M == 0) {
      run(&task, 0);
    } else {
      ok(api, api.KernelContext_ParallelFor(ctx, run, static_cast<size_t>(task.tasks), 0, &task),
         "could not run on ONNX Runtime's threads");
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    try {
      compute(ctx);
      return nullptr;
    } catch (const OpError& e) {
      return g_api->CreateStatus(ORT_INVALID_ARGUMENT, ("qlora_kernels.LinearDense " + node + ": " + e.msg).c_str());
    } catch (const std::exception& e) {
      return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, ("qlora_kernels.LinearDense " + node + ": " + e.what()).c_str());
    }
  }
};

struct LinearDenseOp : Ort::CustomOpBase<LinearDenseOp, LinearDenseKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new LinearDenseKernel(api, info);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_RUNTIME_EXCEPTION, ("qlora_kernels.LinearDense: " + std::string(e.what())).c_str());
    }
  }
  const char* GetName() const { return "LinearDense"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// Sessions keep pointers to the op and the domain for as long as they live, and ONNX
// Runtime never says when the last one is gone: both stay for the life of the process.
const MatMul4bitOp g_op(Compute::Fp32);
const MatMul4bitOp g_op_int8(Compute::Int8);
const LinearDenseOp g_op_dense;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // older than 1.21: ONNX Runtime reports the unknown op itself
  g_api = api;
  Ort::InitApi(api);
  // one domain for every session (a function-local static: sessions may register concurrently)
  static OrtCustomOpDomain* const domain = [api]() -> OrtCustomOpDomain* {
    OrtCustomOpDomain* d = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &d)) {
      api->ReleaseStatus(st);
      return nullptr;
    }
    for (const OrtCustomOp* op : std::initializer_list<const OrtCustomOp*>{&g_op, &g_op_int8, &g_op_dense}) {
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

// The CPU path the library's kernels take, for the tests and `qlora-kernels info` (ctypes):
// the same choice and the same QLORA_KERNELS_ISA cap as the Python extension (dispatch.h),
// but this library's own copy of it. Returns 0, or -1 for a path this CPU or the cap refuses.
extern "C" __attribute__((visibility("default"))) int qlora_kernels_ort_set_isa(const char* name) {
  try {
    qk::set_isa(name);
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}

extern "C" __attribute__((visibility("default"))) const char* qlora_kernels_ort_isa() {
  return qk::isa_name(qk::current_isa());
}
