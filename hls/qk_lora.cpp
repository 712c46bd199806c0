// LoRA projections with the rank-r accumulators on chip: the down projection u = x A^T
// (r <= QK_LORA_MAX_R values per row of x, never leaving the kernel until the row is
// done) and the up projection y = y_in + scaling * u B^T (u's rows held in registers
// while B streams). Both use QK_LORA_LANES multipliers and a fixed 64-input adder tree.
#include <cassert>

#include "qk_common.h"
#include "qk_kernels.h"

namespace {

static_assert(QK_LORA_LANES == 64 && QK_LORA_MAX_R == 64, "the chunk reader assembles 4 beats of 16 floats");
static_assert((QK_LORA_TM & (QK_LORA_TM - 1)) == 0 && QK_LORA_TM == 16, "y beats hold QK_LORA_TM rows");

struct qk_chunk_t {
  float v[QK_LORA_LANES];
};

inline float qk_tree64(const float* v) { return qk_tree32(v) + qk_tree32(v + 32); }

// Assembles a x b chunks of 64 floats from 4 consecutive beats each, `reps` times.
void qk_read_chunks(const qk_word_t* src, qk_stream<qk_chunk_t>& out, int a, int b, int reps) {
  const int chunks = a * b;
  qk_chunk_t c;
lora_chunk_rep:
  for (int r = 0; r < reps; ++r) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=256
  lora_chunk_beat:
    for (int i = 0; i < 4 * chunks; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=4 max=65536
#pragma HLS PIPELINE II=1
      const qk_word_t b = src[i];
    lora_chunk_lane:
      for (int l = 0; l < 16; ++l) {
#pragma HLS UNROLL
        c.v[16 * (i & 3) + l] = qk_word_f32(b, l);
      }
      if ((i & 3) == 3) out.write(c);
    }
  }
}

void qk_lora_down_core(qk_stream<qk_chunk_t>& as, const qk_word_t* x, qk_word_t* u, int mtiles, int kchunks, int r) {
  float acc[QK_LORA_TM][QK_LORA_MAX_R];
  float xk[QK_LORA_TM][QK_LORA_LANES];
#pragma HLS ARRAY_PARTITION variable=xk dim=2 complete
  qk_chunk_t ach;
lora_down_mtile:
  for (int mt = 0; mt < mtiles; ++mt) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=256
  lora_down_zero:
    for (int i = 0; i < QK_LORA_TM * QK_LORA_MAX_R; ++i) {
#pragma HLS PIPELINE II=1
      acc[i / QK_LORA_MAX_R][i % QK_LORA_MAX_R] = 0.0f;
    }
  lora_down_kc:
    for (int kc = 0; kc < kchunks; ++kc) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=256
    lora_down_load_x:
      for (int i = 0; i < QK_LORA_TM * 4; ++i) {
#pragma HLS PIPELINE II=1
        const qk_word_t b = x[((long)mt * kchunks + kc) * QK_LORA_TM * 4 + i];
      lora_down_load_x_lane:
        for (int l = 0; l < 16; ++l) {
#pragma HLS UNROLL
          xk[i / 4][16 * (i & 3) + l] = qk_word_f32(b, l);
        }
      }
    lora_down_rank_m:
      for (int i = 0; i < r * QK_LORA_TM; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=16 max=1024
#pragma HLS PIPELINE II=1
#pragma HLS DEPENDENCE variable=acc inter false  // acc[m][j] recurs once per chunk of K
        const int j = i / QK_LORA_TM, m = i % QK_LORA_TM;
        if (m == 0) ach = as.read();
        float p[QK_LORA_LANES];
#pragma HLS ARRAY_PARTITION variable=p complete
      lora_down_mul:
        for (int l = 0; l < QK_LORA_LANES; ++l) {
#pragma HLS UNROLL
          p[l] = xk[m][l] * ach.v[l];
        }
        acc[m][j] += qk_tree64(p);
      }
    }
  lora_down_store:
    for (int i = 0; i < QK_LORA_TM * 4; ++i) {
#pragma HLS PIPELINE II=1
      qk_word_t b;
    lora_down_store_lane:
      for (int l = 0; l < 16; ++l) {
#pragma HLS UNROLL
        const int j = 16 * (i & 3) + l;
        qk_word_set_f32(b, l, j < r ? acc[i / 4][j] : 0.0f);
      }
      u[(long)mt * QK_LORA_TM * 4 + i] = b;
    }
  }
}

void qk_read_beats(const qk_word_t* src, qk_stream<qk_word_t>& out, int a, int b) {
  const int beats = a * b;
lora_read_beats:
  for (int i = 0; i < beats; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=65536
#pragma HLS PIPELINE II=1
    out.write(src[i]);
  }
}

void qk_lora_up_core(qk_stream<qk_chunk_t>& bs, qk_stream<qk_word_t>& ys, const qk_word_t* u, qk_word_t* y_out,
                     int mtiles, int n_out, float scaling) {
  float ut[QK_LORA_TM][QK_LORA_MAX_R];
  float yo[QK_LORA_TM];
#pragma HLS ARRAY_PARTITION variable=ut dim=2 complete
#pragma HLS ARRAY_PARTITION variable=yo complete
  qk_chunk_t bch;
  qk_word_t yb;
lora_up_mtile:
  for (int mt = 0; mt < mtiles; ++mt) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=256
  lora_up_load_u:
    for (int i = 0; i < QK_LORA_TM * 4; ++i) {
#pragma HLS PIPELINE II=1
      const qk_word_t b = u[(long)mt * QK_LORA_TM * 4 + i];
    lora_up_load_u_lane:
      for (int l = 0; l < 16; ++l) {
#pragma HLS UNROLL
        ut[i / 4][16 * (i & 3) + l] = qk_word_f32(b, l);
      }
    }
  lora_up_n_m:
    for (int i = 0; i < n_out * QK_LORA_TM; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=16 max=262144
#pragma HLS PIPELINE II=1
      const int n = i / QK_LORA_TM, m = i % QK_LORA_TM;
      if (m == 0) {
        bch = bs.read();
        yb = ys.read();
      }
      float p[QK_LORA_MAX_R];
#pragma HLS ARRAY_PARTITION variable=p complete
    lora_up_mul:
      for (int l = 0; l < QK_LORA_MAX_R; ++l) {
#pragma HLS UNROLL
        p[l] = ut[m][l] * bch.v[l];
      }
      const float dot = qk_tree64(p);
      const float scaled = scaling * dot;
      yo[m] = qk_word_f32(yb, m) + scaled;
      if (m == QK_LORA_TM - 1) {
        qk_word_t o;
      lora_up_pack:
        for (int l = 0; l < QK_LORA_TM; ++l) {
#pragma HLS UNROLL
          qk_word_set_f32(o, l, yo[l]);
        }
        y_out[(long)mt * n_out + n] = o;
      }
    }
  }
}

}  // namespace

extern "C" void qk_lora_down(const qk_word_t* x, const qk_word_t* a, qk_word_t* u, int mtiles, int kchunks, int r) {
#pragma HLS INTERFACE m_axi port=x bundle=gmem0 offset=slave
#pragma HLS INTERFACE m_axi port=a bundle=gmem1 offset=slave
#pragma HLS INTERFACE m_axi port=u bundle=gmem2 offset=slave
#pragma HLS INTERFACE s_axilite port=mtiles
#pragma HLS INTERFACE s_axilite port=kchunks
#pragma HLS INTERFACE s_axilite port=r
#pragma HLS INTERFACE s_axilite port=return
  assert(r >= 1 && r <= QK_LORA_MAX_R && kchunks >= 0 && mtiles >= 0);
#pragma HLS DATAFLOW
  qk_stream<qk_chunk_t> as("lora_a");
#pragma HLS STREAM variable=as depth=8
  qk_read_chunks(a, as, kchunks, r, mtiles);
  qk_lora_down_core(as, x, u, mtiles, kchunks, r);
}

extern "C" void qk_lora_up(const qk_word_t* u, const qk_word_t* b, const qk_word_t* y_in, qk_word_t* y_out,
                           int mtiles, int n_out, float scaling) {
#pragma HLS INTERFACE m_axi port=u bundle=gmem0 offset=slave
#pragma HLS INTERFACE m_axi port=b bundle=gmem1 offset=slave
#pragma HLS INTERFACE m_axi port=y_in bundle=gmem2 offset=slave
#pragma HLS INTERFACE m_axi port=y_out bundle=gmem3 offset=slave
#pragma HLS INTERFACE s_axilite port=mtiles
#pragma HLS INTERFACE s_axilite port=n_out
#pragma HLS INTERFACE s_axilite port=scaling
#pragma HLS INTERFACE s_axilite port=return
  assert(n_out >= 0 && mtiles >= 0);
#pragma HLS DATAFLOW
  qk_stream<qk_chunk_t> bs("lora_b");
  qk_stream<qk_word_t> ys("lora_y");
#pragma HLS STREAM variable=bs depth=8
#pragma HLS STREAM variable=ys depth=8
  qk_read_chunks(b, bs, n_out, 1, mtiles);
  qk_read_beats(y_in, ys, mtiles, n_out);
  qk_lora_up_core(bs, ys, u, y_out, mtiles, n_out, scaling);
}
