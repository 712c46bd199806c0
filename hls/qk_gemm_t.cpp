// 4-bit GEMM for the input gradient: dX = dX_in + dY W, W [rows, K] in the tiled layout.
//
// The reduction runs over W's rows, so a block's absmax cannot wait for a partial sum:
// instead dy[m, n] is scaled by the absmax once per 32-lane group (4 multiplies), and each
// lane adds (dy*absmax)*code to its own accumulator. 128 accumulators per row of dY, each
// revisited every QK_GEMM_TM cycles (II=1).
#include <cassert>

#include "qk_common.h"
#include "qk_kernels.h"

namespace {

void qk_gemm_t_core(qk_stream<qk_word_t>& ws, qk_stream<qk_scale4_t>& ss, const qk_word_t* dy,
                    const float* codebook, const qk_word_t* dx_in, qk_word_t* dx_out, int rows, int tiles,
                    int mtiles) {
  float rom[QK_CODES];
  float dyb[QK_GEMM_TM][QK_GEMM_MAX_ROWS];
  float acc[QK_GEMM_TM][QK_LANES];
  float cv[QK_LANES];
  qk_scale4_t a;
#pragma HLS ARRAY_PARTITION variable=rom complete
#pragma HLS ARRAY_PARTITION variable=dyb dim=1 complete
#pragma HLS BIND_STORAGE variable=dyb type=ram_2p impl=uram
#pragma HLS ARRAY_PARTITION variable=acc dim=2 complete
#pragma HLS ARRAY_PARTITION variable=cv complete
  const int rbeats = (rows + 15) / 16;
  const int xbeats = QK_GEMM_TM * (QK_LANES / 16);

  qk_load_rom(codebook, rom);
gemmt_mtile:
  for (int mt = 0; mt < mtiles; ++mt) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=256
    qk_unpack_beats<QK_GEMM_MAX_ROWS>(dy, (long)mt * QK_GEMM_TM * rbeats, QK_GEMM_TM * rbeats, rbeats, dyb);
  gemmt_tile:
    for (int t = 0; t < tiles; ++t) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=64
      const long xoff = ((long)mt * tiles + t) * xbeats;
      qk_unpack_beats<QK_LANES>(dx_in, xoff, xbeats, QK_LANES / 16, acc);
    gemmt_row_m:
      for (int i = 0; i < rows * QK_GEMM_TM; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=16 max=65536
#pragma HLS PIPELINE II=1
#pragma HLS DEPENDENCE variable=acc inter false  // acc[m][*] recurs every TM cycles
        const int n = i / QK_GEMM_TM, m = i % QK_GEMM_TM;
        if (m == 0) {
          const qk_word_t wv = ws.read();
          a = ss.read();
          qk_decode_beat(wv, rom, cv);
        }
        const float d = dyb[m][n];
        float ds[QK_SCALE_SLOTS];
#pragma HLS ARRAY_PARTITION variable=ds complete
      gemmt_scale:
        for (int g = 0; g < QK_SCALE_SLOTS; ++g) {
#pragma HLS UNROLL
          ds[g] = d * a.a[g];
        }
      gemmt_mac:
        for (int l = 0; l < QK_LANES; ++l) {
#pragma HLS UNROLL
          const float prod = ds[l / QK_GROUP_MIN] * cv[l];
          acc[m][l] += prod;
        }
      }
      qk_pack_beats<QK_LANES>(acc, dx_out, xoff, xbeats, QK_LANES / 16);
    }
  }
}

}  // namespace

extern "C" void qk_gemm_4bit_t(const qk_word_t* w, const qk_word_t* scales, const qk_word_t* dy,
                               const float* codebook, const qk_word_t* dx_in, qk_word_t* dx_out, int rows, int tiles,
                               int spw, int mtiles) {
#pragma HLS INTERFACE m_axi port=w bundle=gmem0 offset=slave max_read_burst_length=64
#pragma HLS INTERFACE m_axi port=scales bundle=gmem1 offset=slave
#pragma HLS INTERFACE m_axi port=dy bundle=gmem2 offset=slave
#pragma HLS INTERFACE m_axi port=codebook bundle=gmem2 offset=slave
#pragma HLS INTERFACE m_axi port=dx_in bundle=gmem3 offset=slave
#pragma HLS INTERFACE m_axi port=dx_out bundle=gmem3 offset=slave
#pragma HLS INTERFACE s_axilite port=rows
#pragma HLS INTERFACE s_axilite port=tiles
#pragma HLS INTERFACE s_axilite port=spw
#pragma HLS INTERFACE s_axilite port=mtiles
#pragma HLS INTERFACE s_axilite port=return
  assert(rows >= 0 && rows <= QK_GEMM_MAX_ROWS && tiles >= 0 && tiles <= QK_GEMM_MAX_TILES && mtiles >= 0);
  assert(spw == 1 || spw == 2 || spw == 4);
#pragma HLS DATAFLOW
  qk_stream<qk_word_t> ws("gemmt_w");
  qk_stream<qk_scale4_t> ss("gemmt_scales");
#pragma HLS STREAM variable=ws depth=32
#pragma HLS STREAM variable=ss depth=32
  qk_read_words(w, ws, rows, tiles, mtiles);
  qk_read_scales(scales, ss, rows, tiles, spw, mtiles);
  qk_gemm_t_core(ws, ss, dy, codebook, dx_in, dx_out, rows, tiles, mtiles);
}
