// Decode unit: 4-bit codes -> fp32 (dequantize), and the 8-bit absmax of double
// quantization -> fp32. Both are bit-exact with the reference: one fp32 multiply per
// element (plus one fp32 add for the absmax offset), in the reference's order.
#include <cassert>

#include "qk_common.h"
#include "qk_kernels.h"

namespace {

// One block's absmax per output beat: each value is read once and repeated, so the
// core never issues a second m_axi read in its II=1 loop.
void qk_dec_scales(const float* absmax, qk_stream<float>& out, int n, int blocksize) {
  const int beats = (n + QK_DECODE_LANES - 1) / QK_DECODE_LANES, beats_per_block = blocksize / QK_DECODE_LANES;
  int beat = 0;
  const int blocks = (beats + beats_per_block - 1) / beats_per_block;
dec_scale_block:
  for (int blk = 0; blk < blocks; ++blk) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=1048576
    const float a = absmax[blk];
  dec_scale_rep:
    for (int r = 0; r < beats_per_block && beat < beats; ++r, ++beat) {
#pragma HLS LOOP_TRIPCOUNT min=2 max=256
#pragma HLS PIPELINE II=1
      out.write(a);
    }
  }
}

// The packed input: `per_word` output beats come from each input beat (8 for 4-bit codes,
// 4 for 8-bit codes).
void qk_dec_words(const qk_word_t* in, qk_stream<qk_word_t>& out, int n, int per_word) {
  const int words = ((n + QK_DECODE_LANES - 1) / QK_DECODE_LANES + per_word - 1) / per_word;
dec_read_words:
  for (int i = 0; i < words; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=1048576
#pragma HLS PIPELINE II=1
    out.write(in[i]);
  }
}

// 16 outputs per cycle; a packed beat (128 nibbles) feeds 8 output beats.
void qk_dec_core(qk_stream<qk_word_t>& packed, qk_stream<float>& scales, const float* codebook, qk_word_t* out,
                 int n) {
  const int beats = (n + QK_DECODE_LANES - 1) / QK_DECODE_LANES;
  float rom[QK_CODES];
#pragma HLS ARRAY_PARTITION variable=rom complete
  qk_load_rom(codebook, rom);
  qk_word_t pw;
dec_beats:
  for (int beat = 0; beat < beats; ++beat) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=8388608
#pragma HLS PIPELINE II=1
    if ((beat & 7) == 0) pw = packed.read();
    const float a = scales.read();
    const int byte0 = (beat & 7) * (QK_DECODE_LANES / 2);
    qk_word_t o;
  dec_lanes:
    for (int l = 0; l < QK_DECODE_LANES; ++l) {
#pragma HLS UNROLL
      const unsigned byte = qk_byte(pw, byte0 + l / 2);
      const unsigned nib = (l & 1) ? (byte & 0xFu) : (byte >> 4);  // even element: high nibble
      qk_word_set_f32(o, l, rom[nib] * a);
    }
    out[beat] = o;
  }
}

void qk_dq_core(qk_stream<qk_word_t>& codes, qk_stream<float>& scales, const float* dmap, float offset,
                qk_word_t* out, int n) {
  const int beats = (n + QK_DECODE_LANES - 1) / QK_DECODE_LANES;
  // QK_DECODE_LANES lookups a cycle at data-dependent indices: a cyclic partition cannot
  // exclude bank conflicts (II > 1), so each pair of lanes reads its own true dual-port copy.
  float map[QK_DECODE_LANES / 2][256];
#pragma HLS ARRAY_PARTITION variable=map dim=1 complete
#pragma HLS BIND_STORAGE variable=map type=ram_t2p impl=bram
dq_load_map:
  for (int j = 0; j < 256; ++j) {
#pragma HLS PIPELINE II=1
    const float v = dmap[j];
  dq_copies:
    for (int k = 0; k < QK_DECODE_LANES / 2; ++k) {
#pragma HLS UNROLL
      map[k][j] = v;
    }
  }
  qk_word_t qw;
dq_beats:
  for (int beat = 0; beat < beats; ++beat) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=65536
#pragma HLS PIPELINE II=1
    if ((beat & 3) == 0) qw = codes.read();  // 64 codes feed 4 output beats
    const float a2 = scales.read();
    qk_word_t o;
  dq_lanes:
    for (int l = 0; l < QK_DECODE_LANES; ++l) {
#pragma HLS UNROLL
      const unsigned q = qk_byte(qw, (beat & 3) * QK_DECODE_LANES + l);
      const float scaled = map[l / 2][q] * a2;  // two statements: the multiply rounds before the add
      qk_word_set_f32(o, l, scaled + offset);
    }
    out[beat] = o;
  }
}

}  // namespace

extern "C" void qk_decode_4bit(const qk_word_t* packed, const float* absmax, const float* codebook, qk_word_t* out,
                               int n, int blocksize) {
#pragma HLS INTERFACE m_axi port=packed bundle=gmem0 offset=slave max_read_burst_length=64
#pragma HLS INTERFACE m_axi port=absmax bundle=gmem1 offset=slave
#pragma HLS INTERFACE m_axi port=codebook bundle=gmem1 offset=slave
#pragma HLS INTERFACE m_axi port=out bundle=gmem2 offset=slave max_write_burst_length=64
#pragma HLS INTERFACE s_axilite port=n
#pragma HLS INTERFACE s_axilite port=blocksize
#pragma HLS INTERFACE s_axilite port=return
  assert(n >= 0 && blocksize >= QK_GROUP_MIN && blocksize % QK_DECODE_LANES == 0);  // the host checks
#pragma HLS DATAFLOW
  qk_stream<qk_word_t> pw("dec_packed");
  qk_stream<float> sc("dec_absmax");
#pragma HLS STREAM variable=pw depth=16
#pragma HLS STREAM variable=sc depth=32
  qk_dec_words(packed, pw, n, 8);
  qk_dec_scales(absmax, sc, n, blocksize);
  qk_dec_core(pw, sc, codebook, out, n);
}

extern "C" void qk_absmax_dq(const qk_word_t* q, const float* absmax2, const float* dmap, float offset,
                             qk_word_t* out, int n, int blocksize2) {
#pragma HLS INTERFACE m_axi port=q bundle=gmem0 offset=slave
#pragma HLS INTERFACE m_axi port=absmax2 bundle=gmem1 offset=slave
#pragma HLS INTERFACE m_axi port=dmap bundle=gmem1 offset=slave
#pragma HLS INTERFACE m_axi port=out bundle=gmem2 offset=slave
#pragma HLS INTERFACE s_axilite port=offset
#pragma HLS INTERFACE s_axilite port=n
#pragma HLS INTERFACE s_axilite port=blocksize2
#pragma HLS INTERFACE s_axilite port=return
  assert(n >= 0 && blocksize2 >= QK_DECODE_LANES && blocksize2 % QK_DECODE_LANES == 0);
#pragma HLS DATAFLOW
  qk_stream<qk_word_t> qs("dq_codes");
  qk_stream<float> sc("dq_absmax2");
#pragma HLS STREAM variable=qs depth=16
#pragma HLS STREAM variable=sc depth=32
  qk_dec_words(q, qs, n, 4);
  qk_dec_scales(absmax2, sc, n, blocksize2);
  qk_dq_core(qs, sc, dmap, offset, out, n);
}
