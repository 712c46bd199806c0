// Top functions of the HLS kernels (Vitis style: extern "C", m_axi data, s_axilite sizes).
//
// Device layouts. The host (hls/host/qk_host.h) turns bitsandbytes' packed weight into
// these once, when a weight is loaded onto the board, exactly as FINN/hls4ml fold weights
// for their PE/SIMD arrays:
//
//  * tiled 4-bit weight, W [N, K], K padded to T = ceil(K/128) tiles of 128 columns:
//    beat (t, n) = columns 128t .. 128t+127 of row n, 64 bytes, element 2j in the high
//    nibble of byte j (bitsandbytes' nibble order); beats stored tile-major, row-minor, so
//    one tile streams as one long burst while its x values stay on chip. Padding columns
//    hold nibble 0 and meet x = 0.
//  * scales: per beat, `spw` = 128 / min(blocksize, 128) fp32 absmax values (2 for the
//    default blocksize 64), in beat order, packed 16 to a 512-bit beat. Requires
//    K % blocksize == 0 (blocks never straddle rows), as every transformer layer has.
//  * codebook: the 16 fp32 code values, passed in (never compiled in) and loaded into a
//    fully partitioned ROM at kernel start.
#ifndef QK_KERNELS_H
#define QK_KERNELS_H

#include <cstdint>

#include "qk_hls_types.h"

extern "C" {

// out[i] = codebook[nibble i] * absmax[i / blocksize], one fp32 multiply per element
// (bit-exact with the reference). packed: ceil(n/2) bytes in beats; out: ceil(n/16) beats.
void qk_decode_4bit(const qk_word_t* packed, const float* absmax, const float* codebook, qk_word_t* out, int n,
                    int blocksize);

// Double quantization's absmax: out[i] = dmap[q[i]] * absmax2[i / blocksize2] + offset.
void qk_absmax_dq(const qk_word_t* q, const float* absmax2, const float* dmap, float offset, qk_word_t* out, int n,
                  int blocksize2);

// y[n] = y_in[n] + sum_k x[k] * W[n, k] for one row slice (rows <= QK_GEMV_MAX_ROWS):
// x-stationary, a table per byte lane, absmax once per 32/64/128-element group after its
// partial sum. fmt 0: 4-bit, tiles <= QK_GEMV_MAX_TILES of 128 columns, x: tiles*128
// floats. fmt 1: bf16 weight (an unquantized lm_head) in beats of 32 columns, tile-major,
// tiles of 32 columns, `scales` and `codebook` unused. y: rows floats (padded to 16).
void qk_gemv_4bit(const qk_word_t* w, const qk_word_t* scales, const qk_word_t* x, const float* codebook,
                  const qk_word_t* y_in, qk_word_t* y_out, int rows, int tiles, int spw, int fmt);

// Y = Y_in + X W^T for mtiles tiles of QK_GEMM_TM rows of X. x layout [mt][t][TM][128];
// y layout [mt][TM][rows padded to 16]. Each weight beat is decoded once per TM rows.
void qk_gemm_4bit(const qk_word_t* w, const qk_word_t* scales, const qk_word_t* x, const float* codebook,
                  const qk_word_t* y_in, qk_word_t* y_out, int rows, int tiles, int spw, int mtiles);

// dX = dX_in + dY W (the input gradient): dy layout [mt][TM][rows padded to 16];
// dx layout [mt][t][TM][128]. The block's absmax scales dy once per group, not each weight.
void qk_gemm_4bit_t(const qk_word_t* w, const qk_word_t* scales, const qk_word_t* dy, const float* codebook,
                    const qk_word_t* dx_in, qk_word_t* dx_out, int rows, int tiles, int spw, int mtiles);

// LoRA down projection u = x A^T with r <= QK_LORA_MAX_R rank accumulators per row on chip.
// x layout [mt][kc][TM][64]; A layout [kc][r][64]; u layout [mt][TM][64] (rank padded to 64).
void qk_lora_down(const qk_word_t* x, const qk_word_t* a, qk_word_t* u, int mtiles, int kchunks, int r);

// LoRA up projection y = y_in + scaling * u B^T. u layout [mt][TM][64]; B layout [n][64]
// (rank padded with zeros); y layout [mt][n][TM].
void qk_lora_up(const qk_word_t* u, const qk_word_t* b, const qk_word_t* y_in, qk_word_t* y_out, int mtiles,
                int n_out, float scaling);

}  // extern "C"

#endif  // QK_KERNELS_H
