// qlora-kernels: the int8-compute variant of the fused 4-bit linear forward (opt-in,
// inference), the CPU counterpart of ONNX Runtime's MatMulNBits accuracy_level=4 and of
// llama.cpp's 8-bit activation dot products. torch-free.
//
// Same weight layout as linear4.h. Two extra roundings define it (the reference is
// qlora_kernels.backends.reference.linear_4bit_int8):
//   * x is quantized per group of `blocksize` elements of each row (groups start at the
//     row start): amax = max|x|, xq = clamp(rint(x * (127 / amax)), -127, 127) (ties to
//     even, fp32), sx = amax / 127^2 (fp32; the codebook's 1/127 folded in); an all-zero
//     group gives xq = 0, sx = 0, a non-finite one xq = 0, sx = NaN (the row's outputs
//     become NaN, as in fp32);
//   * the 16-entry codebook is used as int8 code8 = rint(code * 127) (formats.py).
// Along a row, the elements are cut into segments where both the x group and the weight
// block stay the same; y[m, n] = sum_seg float(sum_k xq[k] * code8[q]) * (absmax_b * sx_g)
// (+ bias): the integer sums are exact, the fp32 part is one product per segment and the
// sum of the segments (in partial sums of at most 8 elements each on the SIMD path).
#pragma once
#include <cstdint>

#include "linear4.h"

namespace qk {

// Limits of that definition, checked where a caller hands in its own table and sizes (the
// bindings, the ONNX Runtime operator): codes in [-127, 127] (rint(code * 127) of a codebook
// within [-1, 1]; -128 would defeat the AVX2 kernels' sign transfer, which negates codes),
// and blocks of at most 2^16 elements, whose exact integer sums (<= 2^16 * 127^2) fit int32.
constexpr int64_t kQ8MaxBlocksize = int64_t(1) << 16;
inline bool linear4_q8_code_ok(const int8_t* code8) {
  for (int j = 0; j < 16; ++j)
    if (code8[j] == -128) return false;
  return true;
}

struct Weight4Q8 {
  const uint8_t* packed;
  const float* absmax;
  const int8_t* code8;  // 16 entries, index = nibble
  int64_t N, K, blocksize;
};

void linear4_q8_forward_scalar(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias,
                               float* y, int64_t ldy, int nthreads);
#if defined(QK_X86)
// AVX2: rows of whole 64-element chunks, blocksize 32 or a multiple of 64.
bool linear4_q8_avx2_fits(const Weight4Q8& w);
void linear4_q8_forward_avx2(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias,
                             float* y, int64_t ldy, int nthreads);
// AVX-512 VNNI + VBMI: rows of whole 128-element chunks whose blocks either cover whole
// chunks or split them on 8-element groups (linear4_q8_plan says which path runs).
bool linear4_q8_avx512vnni_fits(const Weight4Q8& w);
void linear4_q8_forward_avx512vnni(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias,
                                   float* y, int64_t ldy, int nthreads);
#endif

// Repacked weight of the one-row kernels (compute="int8" at M=1, built once
// per weight and cached by qlora_kernels.functional, as ONNX Runtime prepacks MatMulNBits
// weights). Rows of whole blocks (K % blocksize == 0) are cut into panels of 16 blocks;
// panel p of row n is blocksize / 8 vectors of 64 bytes, and byte 4j + i of vector v is
// byte 4v + i of block 16p + j of the row (zero past the row's last block). Lane j of a
// vpdpbusd over a panel then only meets block 16p + j, so the 16 block scales of a panel
// apply once, to one vector, instead of per 128-element chunk (~4 of ~9 zmm operations per
// chunk in the bitsandbytes layout).
// K % blocksize == 0, blocksize % 16 == 0, blocksize <= kQ8MaxBlocksize
constexpr int64_t kQ8PanelBlocks = 16;  // blocks per panel of the repacked layout
bool linear4_q8_repack_shape_ok(int64_t K, int64_t blocksize);
int64_t linear4_q8_repacked_bytes(int64_t N, int64_t K, int64_t blocksize);
void linear4_q8_repack(const uint8_t* packed, int64_t N, int64_t K, int64_t blocksize, uint8_t* out, int nthreads);
// Whether the current ISA has the repacked kernel for this shape (else callers keep to
// linear4_q8_forward), which kernel that is ("avx512-vnni-repacked", "avx2-repacked" or ""
// for none), and the kernel (only when it fits): rows of x one at a time, each streaming
// the repacked weight (meant for M = 1). Same definition, same bound. On AVX2 a 64-byte
// vector is read as two halves (blocks 16p + 0..7 and 16p + 8..15): one layout for both.
// Either is chosen only where a row's padding to whole panels is at most a quarter of it
// (or, AVX2, the chunked kernel does not take the shape), since both work through the
// padding as through data.
bool linear4_q8_repacked_fits(int64_t N, int64_t K, int64_t blocksize);
const char* linear4_q8_repacked_plan(int64_t N, int64_t K, int64_t blocksize);
#if defined(QK_X86)
void linear4_q8_forward_repacked_avx2(const float* x, int64_t M, int64_t ldx, const uint8_t* repacked,
                                      const Weight4Q8& w, const float* bias, float* y, int64_t ldy, int nthreads);
void linear4_q8_forward_repacked_avx512vnni(const float* x, int64_t M, int64_t ldx, const uint8_t* repacked,
                                            const Weight4Q8& w, const float* bias, float* y, int64_t ldy,
                                            int nthreads);
#endif
void linear4_q8_forward_repacked(const float* x, int64_t M, int64_t ldx, const uint8_t* repacked, const Weight4Q8& w,
                                 const float* bias, float* y, int64_t ldy, int nthreads);

// The path a call takes on the current ISA ("avx512-vnni", "avx2" or "scalar") and the call.
const char* linear4_q8_plan(const Weight4Q8& w);
void linear4_q8_forward(const float* x, int64_t M, int64_t ldx, const Weight4Q8& w, const float* bias, float* y,
                        int64_t ldy, int nthreads);

}  // namespace qk
