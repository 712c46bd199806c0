// 4-bit GEMM tile engine (training-sized batches): Y = Y_in + X W^T.
//
// Weight-stationary per beat: a 128-weight beat is decoded once (codebook ROM lookups, no
// absmax multiply per weight) and reused for QK_GEMM_TM rows of X, one row per cycle, so
// HBM supplies a beat every TM cycles and the engine is bound by its 128 fp32 multipliers.
// Each 32-element group's partial sum is scaled by its block's absmax once, then added to
// an accumulator that is revisited every TM cycles (TM > the fadd latency: II=1).
#include <cassert>

#include "qk_common.h"
#include "qk_kernels.h"

namespace {

static_assert((QK_GEMM_TM & (QK_GEMM_TM - 1)) == 0, "TM must be a power of two");

void qk_gemm_core(qk_stream<qk_word_t>& ws, qk_stream<qk_scale4_t>& ss, const qk_word_t* x, const float* codebook,
                  const qk_word_t* y_in, qk_word_t* y_out, int rows, int tiles, int spw, int mtiles) {
  float rom[QK_CODES];
  float acc[QK_GEMM_TM][QK_GEMM_MAX_ROWS];
  float xk[QK_GEMM_TM][QK_LANES];
  float cv[QK_LANES];
  qk_scale4_t a;
#pragma HLS ARRAY_PARTITION variable=rom complete
#pragma HLS ARRAY_PARTITION variable=acc dim=1 complete
#pragma HLS BIND_STORAGE variable=acc type=ram_2p impl=uram
#pragma HLS ARRAY_PARTITION variable=xk dim=2 complete
#pragma HLS ARRAY_PARTITION variable=cv complete
  const int rbeats = (rows + 15) / 16;

  qk_load_rom(codebook, rom);
gemm_mtile:
  for (int mt = 0; mt < mtiles; ++mt) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=256
    const long yoff = (long)mt * QK_GEMM_TM * rbeats;
    qk_unpack_beats<QK_GEMM_MAX_ROWS>(y_in, yoff, QK_GEMM_TM * rbeats, rbeats, acc);
  gemm_tile:
    for (int t = 0; t < tiles; ++t) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=64
      const int xbeats = QK_GEMM_TM * (QK_LANES / 16);
      qk_unpack_beats<QK_LANES>(x, ((long)mt * tiles + t) * xbeats, xbeats, QK_LANES / 16, xk);
    gemm_row_m:
      for (int i = 0; i < rows * QK_GEMM_TM; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=16 max=65536
#pragma HLS PIPELINE II=1
#pragma HLS DEPENDENCE variable=acc inter false  // acc[m][n] recurs every TM cycles
        const int n = i / QK_GEMM_TM, m = i % QK_GEMM_TM;
        if (m == 0) {
          const qk_word_t wv = ws.read();
          a = ss.read();
          qk_decode_beat(wv, rom, cv);
        }
        float p[QK_LANES], s[QK_SCALE_SLOTS];
#pragma HLS ARRAY_PARTITION variable=p complete
#pragma HLS ARRAY_PARTITION variable=s complete
      gemm_mul:
        for (int l = 0; l < QK_LANES; ++l) {
#pragma HLS UNROLL
          p[l] = xk[m][l] * cv[l];
        }
      gemm_groups:
        for (int g = 0; g < QK_SCALE_SLOTS; ++g) {
#pragma HLS UNROLL
          s[g] = qk_tree32(p + g * QK_GROUP_MIN);
        }
        acc[m][n] += qk_apply_scales(s, a, spw);
      }
    }
    qk_pack_beats<QK_GEMM_MAX_ROWS>(acc, y_out, yoff, QK_GEMM_TM * rbeats, rbeats);
  }
}

}  // namespace

extern "C" void qk_gemm_4bit(const qk_word_t* w, const qk_word_t* scales, const qk_word_t* x, const float* codebook,
                             const qk_word_t* y_in, qk_word_t* y_out, int rows, int tiles, int spw, int mtiles) {
#pragma HLS INTERFACE m_axi port=w bundle=gmem0 offset=slave max_read_burst_length=64
#pragma HLS INTERFACE m_axi port=scales bundle=gmem1 offset=slave
#pragma HLS INTERFACE m_axi port=x bundle=gmem2 offset=slave
#pragma HLS INTERFACE m_axi port=codebook bundle=gmem2 offset=slave
#pragma HLS INTERFACE m_axi port=y_in bundle=gmem3 offset=slave
#pragma HLS INTERFACE m_axi port=y_out bundle=gmem3 offset=slave
#pragma HLS INTERFACE s_axilite port=rows
#pragma HLS INTERFACE s_axilite port=tiles
#pragma HLS INTERFACE s_axilite port=spw
#pragma HLS INTERFACE s_axilite port=mtiles
#pragma HLS INTERFACE s_axilite port=return
  assert(rows >= 0 && rows <= QK_GEMM_MAX_ROWS && tiles >= 0 && tiles <= QK_GEMM_MAX_TILES && mtiles >= 0);
  assert(spw == 1 || spw == 2 || spw == 4);
#pragma HLS DATAFLOW
  qk_stream<qk_word_t> ws("gemm_w");
  qk_stream<qk_scale4_t> ss("gemm_scales");
#pragma HLS STREAM variable=ws depth=32
#pragma HLS STREAM variable=ss depth=32
  qk_read_words(w, ws, rows, tiles, mtiles);
  qk_read_scales(scales, ss, rows, tiles, spw, mtiles);
  qk_gemm_core(ws, ss, x, codebook, y_in, y_out, rows, tiles, spw, mtiles);
}
