// qlora_kernels.LinearDense: Y[..., N] = A[..., K] @ W^T for a dense fp32 W [N, K] (a
// decoder's tied output head, which ONNX Runtime runs as Gemm(transB=1) on the embedding
// table: 4.3 ms of a 10 ms SmolLM2 decode step). Our dense kernel (dense.h, the fused
// loss's and the native decode step's head) streams W once at one row; rows are split
// over ONNX Runtime's threads at any row.
#include <algorithm>
#include <cstdint>
#include <string>

#include "../dense.h"
#include "ort_common.h"

namespace qk_ort {
namespace {

struct Task {
  const float *x, *w;
  int64_t M, K, N;
  float* y;
  Slices slices;
};

void run(void* p, size_t t) {
  const Task& k = *static_cast<const Task*>(p);
  const auto [n0, n1] = k.slices.rows(t);
  if (n1 <= n0) return;
  const qk::DenseWeight w{k.w + n0 * k.K, n1 - n0, k.K, k.K};
  qk::dense_kernels().forward(k.x, k.M, k.K, w, nullptr, k.y + n0, k.N, 1);
}

struct LinearDenseKernel {
  std::string who;

  LinearDenseKernel(const OrtApi& api, const OrtKernelInfo* info)
      : who("qlora_kernels.LinearDense " + node_name(api, info) + ": ") {}

  void compute(OrtKernelContext* ctx) const {
    const OrtApi& api = *g_api;
    const auto in = inputs(api, ctx, 2, "A, W");
    const TensorView a = view(api, in[0], "A"), w = view(api, in[1], "W");
    if (a.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw OpError{"input A must be float"};
    if (w.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || w.shape.size() != 2)
      throw OpError{"input W must be a float matrix [N, K], got " + shape_str(w.shape)};
    const int64_t N = w.shape[0], K = w.shape[1];
    if (a.shape.empty() || a.shape.back() != K)
      throw OpError{"input A must be [..., K=" + s(K) + "], got " + shape_str(a.shape)};
    float* y = output(api, ctx, a.shape, N);
    int64_t M = 1;
    for (size_t i = 0; i + 1 < a.shape.size(); ++i) M *= a.shape[i];
    if (M == 0 || N == 0) return;
    if (K == 0) {  // an empty sum: the kernel is not called, the output must still be written
      std::fill(y, y + M * N, 0.0f);
      return;
    }
    Task task{data<float>(api, in[0]), data<float>(api, in[1]), M, K, N, y, Slices(N, 1)};
    run_slices(api, ctx, task.slices, run, &task);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    return guarded(*g_api, who, [&] { compute(ctx); });
  }
};

struct LinearDenseOp : Ort::CustomOpBase<LinearDenseOp, LinearDenseKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return guarded(api, "qlora_kernels.LinearDense: ", [&] { *kernel = new LinearDenseKernel(api, info); });
  }
  const char* GetName() const { return "LinearDense"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

const LinearDenseOp g_op;

}  // namespace

const OrtCustomOp* linear_dense_op() { return &g_op; }

}  // namespace qk_ort
