// Host side of the HLS kernels (not synthesized): the device layouts the kernels read,
// and the call sequences a board's host program would issue, here calling the
// C-simulated top functions directly. Used by the testbenches (hls/tb) and by the
// Python `hls` backend (qlora_kernels._hls).
//
// Shapes follow the reference: W is [N, K] row-major, flattened into blocks of
// `blocksize` elements with one fp32 absmax each; packed holds two codes per byte, the
// even element in the high nibble.
#ifndef QK_HOST_H
#define QK_HOST_H

#include <cstdint>
#include <vector>

#include "../qk_kernels.h"

namespace qk_host {

using Beats = std::vector<qk_word_t>;

// Zero-filled beats holding `n` floats (or bytes) copied from src.
Beats beats_from_floats(const float* src, int64_t n);
Beats beats_from_bytes(const uint8_t* src, int64_t n);
void floats_from_beats(const Beats& b, float* dst, int64_t n);

// Absmax values per weight beat: 128 / min(blocksize, 128).
int scales_per_beat(int64_t blocksize);

// Rows [n0, n1) and 128-column tiles [t0, t1) of W in the tiled layout (qk_kernels.h),
// plus their scales. Requires K % blocksize == 0.
struct Tiled {
  Beats words, scales;
  int rows = 0, tiles = 0, spw = 0;
};
Tiled pack_tiled(const uint8_t* packed, const float* absmax, int64_t N, int64_t K, int64_t blocksize, int64_t n0,
                 int64_t n1, int64_t t0, int64_t t1);

// Rows [n0, n1) and 32-column tiles [t0, t1) of a bf16 weight [N, K] (raw 16-bit
// patterns) for qk_gemv_4bit's bf16 mode; padding columns are +0.
Beats pack_bf16_tiled(const uint16_t* w, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t t0, int64_t t1);

// ---- whole operations, split into calls that respect the kernels' on-chip limits ----

// out[i] = code[nibble i] * absmax[i / blocksize], i < n (qk_decode_4bit).
void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                     float* out);

// out[i] = dmap[q[i]] * absmax2[i / blocksize2] + offset (qk_absmax_dq).
void absmax_dq(const uint8_t* q, const float* absmax2, const float* dmap, float offset, int64_t n,
               int64_t blocksize2, float* out);

// y[M, N] = x[M, K] W^T (+ bias). GEMV engine for M == 1, GEMM engine otherwise; when a
// block straddles two rows (K % blocksize != 0) the decode unit expands W and the LoRA
// down-projection engine multiplies it, QK_LORA_MAX_R rows of W at a time.
void linear_4bit(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* absmax, const float* code,
                 int64_t N, int64_t blocksize, const float* bias, float* y);

// dx[M, K] = dy[M, N] W (qk_gemm_4bit_t; the same fallback as above).
void linear_4bit_grad_input(const float* dy, int64_t M, int64_t N, const uint8_t* packed, const float* absmax,
                            const float* code, int64_t K, int64_t blocksize, float* dx);

// y[N] = W x for a bf16 W [N, K] (qk_gemv_4bit, bf16 mode), one row of x.
void gemv_bf16(const uint16_t* w, int64_t N, int64_t K, const float* x, float* y);

// u[M, r] = x[M, K] A^T (qk_lora_down), r <= QK_LORA_MAX_R.
void lora_down(const float* x, int64_t M, int64_t K, const float* a, int64_t r, float* u);

// y[M, N] = y_in + scaling * u[M, r] B^T (qk_lora_up), r <= QK_LORA_MAX_R.
void lora_up(const float* u, int64_t M, int64_t r, const float* b, int64_t N, float scaling, const float* y_in,
             float* y);

}  // namespace qk_host

#endif  // QK_HOST_H
