// qlora-kernels: 4-bit (NF4/FP4) blockwise quantization kernels, torch-free.
//
// Packed layout (bitsandbytes-compatible, the one definition of it lives in
// src/qlora_kernels/formats.py; this header only describes it):
//   * the weight is flattened row-major; element i belongs to block i / blocksize and
//     is scaled by absmax[i / blocksize] (fp32, the block's max |x|);
//   * element i is stored in byte i / 2; an EVEN i sits in the HIGH nibble, an odd i in
//     the low nibble; an odd element count leaves the last low nibble holding the code
//     of 0.0 (bitsandbytes pads the scaled values with zeros before packing);
//   * a nibble is an index into a 16-entry codebook (`code`); quantization picks the
//     bucket of the scaled value among 15 ascending midpoints (`bounds`, ties go to the
//     lower bucket as torch.bucketize does) and maps sorted bucket -> code index
//     through `order` (identity for NF4, a permutation for FP4).
// The codebooks are never spelled out in C++: Python passes them in, so there is no
// second copy to drift.
#pragma once
#include <cstddef>
#include <cstdint>

namespace qk {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct Quant4Tables {
  const float* code;     // [16] codebook, index = nibble
  const float* bounds;   // [15] ascending midpoints between sorted code values
  const uint8_t* order;  // [16] sorted bucket -> nibble
};

// Sizes of the layout for n elements: bytes of codes, and blocks (absmax entries). Internal
// linkage: this header is compiled into ISA-flagged files too, and an inline function with
// external linkage could let the linker keep an AVX-512 copy for every path.
static inline constexpr int64_t packed_bytes(int64_t n) { return (n + 1) / 2; }
static inline constexpr int64_t block_count(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

// Smallest absmax used as a divisor: bitsandbytes clamps with 1e-38 (an fp32
// subnormal), so all-zero blocks encode as the code of 0.0 instead of NaN.
constexpr float kAbsmaxFloor = 1e-38f;

// Returns -1, or the index of the first block holding a NaN/Inf (nothing else is
// guaranteed about the outputs then; Python raises).
using Quantize4Fn = int64_t (*)(const void* x, DType xt, int64_t n, int64_t blocksize,
                                const Quant4Tables& t, uint8_t* packed, float* absmax,
                                int nthreads);
using Dequantize4Fn = void (*)(const uint8_t* packed, const float* absmax, const float* code,
                               int64_t n, int64_t blocksize, void* out, DType ot, int nthreads);

int64_t quantize4_scalar(const void* x, DType xt, int64_t n, int64_t blocksize,
                         const Quant4Tables& t, uint8_t* packed, float* absmax, int nthreads);
void dequantize4_scalar(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                        int64_t blocksize, void* out, DType ot, int nthreads);

#if defined(QK_X86)
int64_t quantize4_avx2(const void* x, DType xt, int64_t n, int64_t blocksize,
                       const Quant4Tables& t, uint8_t* packed, float* absmax, int nthreads);
void dequantize4_avx2(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                      int64_t blocksize, void* out, DType ot, int nthreads);
int64_t quantize4_avx512(const void* x, DType xt, int64_t n, int64_t blocksize,
                         const Quant4Tables& t, uint8_t* packed, float* absmax, int nthreads);
void dequantize4_avx512(const uint8_t* packed, const float* absmax, const float* code, int64_t n,
                        int64_t blocksize, void* out, DType ot, int nthreads);
#endif

// 8-bit blockwise quantization with an arbitrary sorted 256-entry map; used for
// double quantization of the absmax vector (bitsandbytes' "dynamic" map, blocksize 256).
void quantize8_blockwise(const float* x, int64_t n, int64_t blocksize, const float* code,
                         uint8_t* out, float* absmax);
void dequantize8_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                           int64_t blocksize, float* out);

}  // namespace qk
