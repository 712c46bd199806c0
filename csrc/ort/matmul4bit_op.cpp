// qlora_kernels.MatMul4bit and MatMul4bitInt8: the fused 4-bit linear (linear4.h) as ONNX
// Runtime CPU kernels, so that an exported model keeps the exact NF4/FP4 bytes of the
// fine-tuned base and still computes at our kernels' speed. ONNX Runtime's own
// com.microsoft.MatMulBnb4 reads the same bytes but dequantizes the whole weight into a
// temporary fp32 matrix on every call (docs/onnx.md).
//
//   MatMul4bit      Y[..., N] = A[..., K] @ dequant(B)^T, fp32 compute (linear_4bit's bits)
//   MatMul4bitInt8  the same with int8 activations (linear4_q8.h; compute="int8"'s bits)
//   inputs:  A float [..., K]; B uint8 [(N*K+1)/2] (our packed layout = MatMulBnb4's);
//            absmax float [ceil(N*K/block_size)]; code [16], float (MatMul4bit) or int8
//            (MatMul4bitInt8): the codebook, index = nibble, written by the exporter from
//            qlora_kernels.formats (no copy of a codebook here)
//   attributes: K, N, block_size (int)
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <numeric>
#include <string>

#include "../linear4.h"
#include "../linear4_q8.h"
#include "../quant4.h"
#include "ort_common.h"

namespace qk_ort {
namespace {

// fp32 compute, or int8 activations (ONNX Runtime's MatMulNBits accuracy_level 4 is the
// same idea), whose codebook input is the int8 one.
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

// One call's work: a slice of rows [n0, n1) is itself a packed weight when n0*K falls on
// a block boundary, so the slices are cut at multiples of block_size / gcd(K, block_size).
struct Task {
  const float* x;
  int64_t M, K, N, block_size;
  const uint8_t* packed;
  const float* absmax;
  const void* code;
  float* y;
  const uint8_t* repacked;  // the int8 one-row layout, or null
  int64_t repacked_row;
  Slices slices;
};

void run_fp32(void* p, size_t t) {
  const Task& k = *static_cast<const Task*>(p);
  const auto [n0, n1] = k.slices.rows(t);
  if (n1 <= n0) return;
  const int64_t i0 = n0 * k.K;  // a multiple of block_size, so even
  const qk::Weight4 w{k.packed + i0 / 2, k.absmax + i0 / k.block_size, static_cast<const float*>(k.code), n1 - n0,
                      k.K, k.block_size};
  qk::linear4_kernels().forward(k.x, k.M, k.K, w, nullptr, k.y + n0, k.N, 1);
}

void run_int8(void* p, size_t t) {
  const Task& k = *static_cast<const Task*>(p);
  const auto [n0, n1] = k.slices.rows(t);
  if (n1 <= n0) return;
  const int64_t i0 = n0 * k.K;
  const qk::Weight4Q8 w{k.packed + i0 / 2, k.absmax + i0 / k.block_size, static_cast<const int8_t*>(k.code),
                        n1 - n0, k.K, k.block_size};
  if (k.repacked != nullptr)  // rows of whole blocks here (the repack's shape rule): one row's bytes apiece
    qk::linear4_q8_forward_repacked(k.x, k.M, k.K, k.repacked + n0 * k.repacked_row, w, nullptr, k.y + n0, k.N, 1);
  else
    qk::linear4_q8_forward(k.x, k.M, k.K, w, nullptr, k.y + n0, k.N, 1);
}

struct MatMul4bitKernel {
  Compute compute_type;
  int64_t K, N, block_size;
  std::string who;  // "qlora_kernels.<op> <node>: ", the prefix of every error
  // Int8 on a constant weight: the one-row kernels' layout of it, made once here (as
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
    if (c == Compute::Int8 && block_size > qk::kQ8MaxBlocksize)
      throw OpError{"block_size must be at most 65536 for int8 compute, got " + s(block_size)};
    if (K > (int64_t(1) << 40) / N) throw OpError{"N*K is too large"};
    who = std::string("qlora_kernels.") + op_name(c) + " " + node_name(api, info) + ": ";
    if (c == Compute::Int8 && qk::linear4_q8_repacked_fits(N, K, block_size)) {
      int is_constant = 0;
      const OrtValue* b = nullptr;
      OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &b);
      if (st != nullptr) {
        api.ReleaseStatus(st);
      } else if (is_constant && b != nullptr && view(api, b, "B").numel == qk::packed_bytes(N * K)) {
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
    const auto in = inputs(api, ctx, 4, "A, B, absmax, code");
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
    if (int8 && !qk::linear4_q8_code_ok(data<int8_t>(api, in[3])))
      throw OpError{"input code must hold int8 values in [-127, 127] (rint(code * 127)), got -128"};
    if (a.shape.empty() || a.shape.back() != K)
      throw OpError{"input A must be [..., K=" + s(K) + "], got " + shape_str(a.shape)};
    const int64_t n = N * K;
    if (b.numel != qk::packed_bytes(n))
      throw OpError{"input B has " + s(b.numel) + " bytes, a [" + s(N) + ", " + s(K) + "] weight needs " +
                    s(qk::packed_bytes(n))};
    const int64_t blocks = qk::block_count(n, block_size);
    if (am.numel != blocks)
      throw OpError{"input absmax has " + s(am.numel) + " entries, a [" + s(N) + ", " + s(K) +
                    "] weight with block_size " + s(block_size) + " needs " + s(blocks)};
    float* y = output(api, ctx, a.shape, N);
    const int64_t M = a.numel / K;
    if (M == 0) return;
    const uint8_t* packed = data<uint8_t>(api, in[1]);
    // the repacked copy serves one-row calls on the constant it was made from, on a CPU
    // path that has its kernel (the tests switch paths at run time)
    const bool use_repacked =
        int8 && M == 1 && repacked && packed == repacked_from && qk::linear4_q8_repacked_fits(N, K, block_size);
    Task task{data<float>(api, in[0]),
              M,
              K,
              N,
              block_size,
              packed,
              data<float>(api, in[2]),
              int8 ? static_cast<const void*>(data<int8_t>(api, in[3])) : data<float>(api, in[3]),
              y,
              use_repacked ? repacked->p : nullptr,
              repacked_row,
              Slices(N, block_size / std::gcd(K, block_size))};
    run_slices(api, ctx, task.slices, int8 ? run_int8 : run_fp32, &task);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) {
    return guarded(*g_api, who, [&] { compute(ctx); });
  }
};

struct MatMul4bitOp : Ort::CustomOpBase<MatMul4bitOp, MatMul4bitKernel, true> {
  Compute compute_type;
  explicit MatMul4bitOp(Compute c) : compute_type(c) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return guarded(api, std::string("qlora_kernels.") + op_name(compute_type) + ": ",
                   [&] { *kernel = new MatMul4bitKernel(api, info, compute_type); });
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

const MatMul4bitOp g_fp32(Compute::Fp32);
const MatMul4bitOp g_int8(Compute::Int8);

}  // namespace

const OrtCustomOp* matmul4bit_op() { return &g_fp32; }
const OrtCustomOp* matmul4bit_int8_op() { return &g_int8; }

}  // namespace qk_ort
