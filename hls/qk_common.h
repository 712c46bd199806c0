// Stages shared by the 4-bit engines: the weight and scale readers of a DATAFLOW region
// and the fixed adder trees. Header-only so each top function gets its own instances.
#ifndef QK_COMMON_H
#define QK_COMMON_H

#include "qk_hls_types.h"

// Streams `reps` passes over rows x tiles consecutive beats (the GEMM replays the weight
// once per tile of X rows); one beat per cycle, so the burst engine sees one long read.
// Trip counts are computed here, not in the caller: a DATAFLOW region holds only calls.
static inline void qk_read_words(const qk_word_t* w, qk_stream<qk_word_t>& out, int rows, int tiles, int reps) {
  const int words = rows * tiles;
read_words_rep:
  for (int r = 0; r < reps; ++r) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=256
  read_words_beat:
    for (int i = 0; i < words; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=524288
#pragma HLS PIPELINE II=1
      out.write(w[i]);
    }
  }
}

// One qk_scale4_t per weight beat. The scales are packed 16 to a beat, spw per weight beat
// (16 % spw == 0, so a beat's scales never straddle two scale beats); each 32-lane slot
// gets the absmax of the block it lies in.
static inline void qk_read_scales(const qk_word_t* s, qk_stream<qk_scale4_t>& out, int rows, int tiles, int spw,
                                  int reps) {
  const int words = rows * tiles;
read_scales_rep:
  for (int r = 0; r < reps; ++r) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=256
    int beat = 0, pos = 0;
    qk_word_t cur;
  read_scales_word:
    for (int i = 0; i < words; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=524288
#pragma HLS PIPELINE II=1
      if (pos == 0) cur = s[beat++];
      qk_scale4_t v;
    read_scales_slot:
      for (int g = 0; g < QK_SCALE_SLOTS; ++g) {
#pragma HLS UNROLL
        v.a[g] = qk_word_f32(cur, pos + (g * spw) / QK_SCALE_SLOTS);
      }
      out.write(v);
      pos = (pos + spw) & 15;
    }
  }
}

// Balanced trees: the summation order is fixed by the hardware, and the error of each
// partial sum grows with log2 of its length, not its length.
static inline float qk_tree16(const float* v) {
  float l1[8], l2[4];
tree16_l1:
  for (int i = 0; i < 8; ++i) {
#pragma HLS UNROLL
    l1[i] = v[2 * i] + v[2 * i + 1];
  }
tree16_l2:
  for (int i = 0; i < 4; ++i) {
#pragma HLS UNROLL
    l2[i] = l1[2 * i] + l1[2 * i + 1];
  }
  return (l2[0] + l2[1]) + (l2[2] + l2[3]);
}

static inline float qk_tree32(const float* v) { return qk_tree16(v) + qk_tree16(v + 16); }

// The absmax multiplies each block's partial sum once: 4 blocks of 32, 2 of 64, or one
// block (or one 128-column slice of a larger block) per beat. One datapath for all three
// (7 multipliers, 3 adders): a factor that does not apply is 1.0, an exact multiply.
static inline float qk_apply_scales(const float s[QK_SCALE_SLOTS], const qk_scale4_t& a, int spw) {
  const float one = 1.0f;
  float m[QK_SCALE_SLOTS];
apply_scales_32:
  for (int g = 0; g < QK_SCALE_SLOTS; ++g) {
#pragma HLS UNROLL
    m[g] = s[g] * (spw == 4 ? a.a[g] : one);
  }
  const float p01 = m[0] + m[1], p23 = m[2] + m[3];
  const float q01 = p01 * (spw == 2 ? a.a[0] : one), q23 = p23 * (spw == 2 ? a.a[2] : one);
  const float r = q01 + q23;
  return r * (spw == 1 ? a.a[0] : one);
}

// The codebook into a register ROM (the caller partitions rom completely).
static inline void qk_load_rom(const float* codebook, float rom[QK_CODES]) {
qk_load_rom_loop:
  for (int j = 0; j < QK_CODES; ++j) {
#pragma HLS PIPELINE II=1
    rom[j] = codebook[j];
  }
}

// The QK_LANES weights of a beat through the ROM (even lane = high nibble), no absmax.
static inline void qk_decode_beat(const qk_word_t& wv, const float rom[QK_CODES], float cv[QK_LANES]) {
qk_decode_beat_lane:
  for (int l = 0; l < QK_LANES; ++l) {
#pragma HLS UNROLL
    const unsigned byte = qk_byte(wv, l / 2);
    cv[l] = rom[(l & 1) ? (byte & 0xFu) : (byte >> 4)];
  }
}

// Beats src[off .. off + n) of 16 fp32 each into buf, per_row beats to a row of buf.
template <int W>
static inline void qk_unpack_beats(const qk_word_t* src, long off, int n, int per_row, float buf[][W]) {
qk_unpack_beats_loop:
  for (int i = 0; i < n; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=16 max=4096
#pragma HLS PIPELINE II=1
    const qk_word_t b = src[off + i];
  qk_unpack_beats_lane:
    for (int l = 0; l < 16; ++l) {
#pragma HLS UNROLL
      buf[i / per_row][16 * (i % per_row) + l] = qk_word_f32(b, l);
    }
  }
}

// The inverse of qk_unpack_beats: buf into beats dst[off .. off + n).
template <int W>
static inline void qk_pack_beats(const float buf[][W], qk_word_t* dst, long off, int n, int per_row) {
qk_pack_beats_loop:
  for (int i = 0; i < n; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=16 max=4096
#pragma HLS PIPELINE II=1
    qk_word_t b;
  qk_pack_beats_lane:
    for (int l = 0; l < 16; ++l) {
#pragma HLS UNROLL
      qk_word_set_f32(b, l, buf[i / per_row][16 * (i % per_row) + l]);
    }
    dst[off + i] = b;
  }
}

#endif  // QK_COMMON_H
