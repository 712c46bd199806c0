// GEMV engine (batch-1 decode): y = y_in + W x for one slice of W, 4-bit or bf16.
//
// Why x-stationary tables: at HBM rate a U280 must consume ~2,300 4-bit weights per
// cycle, and an fp32 multiply-add per weight costs 5 DSP48E2 (3 for fmul, 2 for fadd):
// far over the device's 9,024. Here a tile of 128 x values stays fixed while every row's
// 128 weights stream past, so the 16 products x*code are computed once per tile, and a
// byte (two nibbles) indexes a 256-entry table of x[2b]*code[hi] + x[2b+1]*code[lo]. Per
// weight beat that leaves 64 table reads, a 64-input adder tree and the block absmax
// multiplies: about 0.5 fadd and no multiplier per weight. The next tile's tables are
// built while the current tile streams (two banks), so a tile costs
// max(rows, QK_BUILD_CYCLES) cycles (plus 8 to latch its x); a QK_PREFETCH_BEATS-deep
// weight FIFO lets HBM run ahead while the first tile's tables are built.
//
// fmt 1 (bf16, e.g. an unquantized lm_head): a bf16 weight is (-1)^s 2^(e-127) (1+m/128),
// so lane i's table holds x*(1+m/128) and an exponent add replaces the multiplier; beats
// hold 32 columns, tiles are 32 wide, and the same tables, builder multipliers and tree
// are used (no absmax).
//
// Numerics: each product is the fp32 x*code (or x*w), sums are fp32 adds in a fixed tree,
// and a block's absmax multiplies its partial sum: within the fp32 dot-product bound of
// the reference (tests/test_linear.py::dot_bound), not bit-exact. bf16 products below the
// normal range flush to zero, as do bf16 subnormal weights.
#include <cassert>

#include "qk_common.h"
#include "qk_kernels.h"

namespace {

constexpr int kProdCycles = QK_LANES * QK_CODES / QK_BUILD_MULS;
constexpr int kPairCycles = QK_BYTE_LANES * QK_PAIR_ENTRIES / QK_BUILD_ADDS;
constexpr int kAddGroups = QK_BYTE_LANES / QK_BUILD_ADDS;
constexpr int kMantGroups = QK_BF16_LANES / QK_BUILD_MULS;
static_assert(kProdCycles + kPairCycles == QK_BUILD_CYCLES, "QK_BUILD_CYCLES must match the builder");
static_assert(QK_BF16_LANES * QK_BF16_MANT / QK_BUILD_MULS == QK_BF16_BUILD_CYCLES, "bf16 builder schedule");
static_assert(QK_LANES == 2 * QK_BYTE_LANES && QK_LANES == QK_SCALE_SLOTS * QK_GROUP_MIN, "lane geometry");
static_assert(QK_BF16_LANES <= QK_BYTE_LANES && QK_BF16_MANT <= QK_PAIR_ENTRIES, "bf16 reuses the pair tables");
static_assert(QK_BF16_BUILD_CYCLES >= 64 && QK_BUILD_CYCLES >= 64, "accumulators recur after a whole tile");

// x*w from the table entry v = x*(1+m/128): exponent arithmetic and sign, no multiplier.
inline float qk_bf16_product(float v, float xl, unsigned h) {
  const unsigned e = (h >> 7) & 0xFFu, m = h & 0x7Fu;
  const uint32_t sign = (uint32_t)(h >> 15) << 31;
  const uint32_t xb = qk_bits(xl);
  const bool x_finite = (xb & 0x7F800000u) != 0x7F800000u;
  if (e == 0) return x_finite ? qk_f32((xb & 0x80000000u) ^ sign) : qk_f32(0x7FC00000u);  // x * +-0 (subnormal w flushed)
  if (e == 255) {
    if (m != 0 || (xb & 0x7FFFFFFFu) == 0) return qk_f32(0x7FC00000u);
    return qk_f32(((xb & 0x80000000u) ^ sign) | 0x7F800000u);
  }
  const uint32_t vb = qk_bits(v);
  const int ev = (int)((vb >> 23) & 0xFFu);
  if (x_finite && (ev == 255 || (ev == 0 && (vb & 0x7FFFFFFFu) != 0))) {
    // The entry x*(1+m/128) left the normal range though x*w need not (x near the fp32 limits):
    // the product from the builder's multiplier instead, rare; its subnormals flush as the rest do.
    const float p = xl * qk_f32((uint32_t)h << 16);
    const uint32_t pb = qk_bits(p);
    return (pb & 0x7F800000u) == 0 ? qk_f32(pb & 0x80000000u) : p;
  }
  if (ev == 255) return qk_f32(vb ^ sign);
  if (ev == 0) return qk_f32((vb & 0x80000000u) ^ sign);
  const int en = ev + (int)e - 127;
  if (en >= 255) return qk_f32(((vb & 0x80000000u) ^ sign) | 0x7F800000u);
  if (en <= 0) return qk_f32((vb & 0x80000000u) ^ sign);
  return qk_f32(((vb & 0x807FFFFFu) ^ sign) | ((uint32_t)en << 23));
}

// The x of each tile, 16 floats per beat (bf16 tiles are 32 columns, 4-bit tiles 128).
void qk_read_x(const qk_word_t* x, qk_stream<qk_word_t>& out, int tiles, int fmt) {
  const int beats = tiles * (fmt ? QK_BF16_LANES : QK_LANES) / 16;
gemv_read_x:
  for (int i = 0; i < beats; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=2 max=512
#pragma HLS PIPELINE II=1
    out.write(x[i]);
  }
}

// Scales of 4-bit weights only; the bf16 mode has none.
void qk_gemv_scales(const qk_word_t* s, qk_stream<qk_scale4_t>& out, int rows, int tiles, int spw, int fmt) {
  qk_read_scales(s, out, fmt ? 0 : rows, tiles, spw, 1);
}

void qk_gemv_core(qk_stream<qk_word_t>& ws, qk_stream<qk_scale4_t>& ss, qk_stream<qk_word_t>& xs,
                  const float* codebook, const qk_word_t* y_in, qk_word_t* y_out, int rows, int tiles, int spw,
                  int fmt) {
  float rom[QK_CODES];
  float xt[2][QK_LANES];  // x of the tile being built and of the tile being streamed
  float acc[QK_GEMV_MAX_ROWS];
  float prod[QK_LANES][QK_CODES];
  float tab[QK_BYTE_LANES][2 * QK_PAIR_ENTRIES];  // two banks: build one, stream the other
#pragma HLS ARRAY_PARTITION variable=rom complete
#pragma HLS ARRAY_PARTITION variable=xt dim=1 complete
#pragma HLS ARRAY_PARTITION variable=xt dim=2 complete
#pragma HLS ARRAY_PARTITION variable=acc cyclic factor=16
#pragma HLS BIND_STORAGE variable=acc type=ram_2p impl=bram
#pragma HLS ARRAY_PARTITION variable=prod dim=1 complete
#pragma HLS BIND_STORAGE variable=prod type=ram_s2p impl=lutram
#pragma HLS ARRAY_PARTITION variable=tab dim=1 complete
#pragma HLS BIND_STORAGE variable=tab type=ram_s2p impl=bram
  const int width = fmt ? QK_BF16_LANES : QK_LANES;  // columns per tile
  const int build_cycles = fmt ? QK_BF16_BUILD_CYCLES : QK_BUILD_CYCLES;
  const qk_scale4_t ones = {{1.0f, 1.0f, 1.0f, 1.0f}};

gemv_load_rom:
  for (int j = 0; j < QK_CODES; ++j) {
#pragma HLS PIPELINE II=1
    rom[j] = fmt ? 0.0f : codebook[j];
  }
gemv_load_y:
  for (int i = 0; i < (rows + 15) / 16; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=512
#pragma HLS PIPELINE II=1
    const qk_word_t b = y_in[i];
  gemv_load_y_lane:
    for (int l = 0; l < 16; ++l) {
#pragma HLS UNROLL
      acc[16 * i + l] = qk_word_f32(b, l);
    }
  }

  // Iteration t streams tile t-1 (bank (t-1)&1) and builds tile t (bank t&1).
gemv_tile:
  for (int t = 0; t <= tiles; ++t) {
#pragma HLS LOOP_TRIPCOUNT min=2 max=257
    const int srows = t > 0 ? rows : 0;
    const int build = t < tiles ? build_cycles : 0;
    const int steps = srows > build ? srows : build;
    const int rd = ((t + 1) & 1) * QK_PAIR_ENTRIES;
    const int wr = (t & 1) * QK_PAIR_ENTRIES;
    const int xw = t & 1, xr = (t + 1) & 1;
  gemv_latch_x:
    for (int i = 0; i < (t < tiles ? width / 16 : 0); ++i) {
#pragma HLS LOOP_TRIPCOUNT min=2 max=8
#pragma HLS PIPELINE II=1
      const qk_word_t b = xs.read();
    gemv_latch_x_lane:
      for (int l = 0; l < 16; ++l) {
#pragma HLS UNROLL
        xt[xw][16 * i + l] = qk_word_f32(b, l);
      }
    }
  gemv_step:
    for (int c = 0; c < steps; ++c) {
#pragma HLS LOOP_TRIPCOUNT min=1024 max=8192
#pragma HLS PIPELINE II=1
#pragma HLS DEPENDENCE variable=xt inter false
// The banks differ (rd != wr); a row's accumulator is revisited one tile later, at least
// a build's worth of cycles on; the pair phase reads products written >= 50 cycles earlier.
#pragma HLS DEPENDENCE variable=tab inter false
#pragma HLS DEPENDENCE variable=acc inter false
#pragma HLS DEPENDENCE variable=prod inter false
      if (c < srows) {
        const qk_word_t wv = ws.read();
        const qk_scale4_t a = fmt ? ones : ss.read();
        float v[QK_BYTE_LANES], s[QK_SCALE_SLOTS];
#pragma HLS ARRAY_PARTITION variable=v complete
#pragma HLS ARRAY_PARTITION variable=s complete
      gemv_lookup:
        for (int b = 0; b < QK_BYTE_LANES; ++b) {
#pragma HLS UNROLL
          const unsigned h = b < QK_BF16_LANES ? (qk_u32(wv, b >> 1) >> (16 * (b & 1))) & 0xFFFFu : 0u;
          const float raw = tab[b][rd + (fmt ? (h & 0x7Fu) : qk_byte(wv, b))];
          v[b] = !fmt ? raw : (b < QK_BF16_LANES ? qk_bf16_product(raw, xt[xr][b], h) : 0.0f);
        }
      gemv_groups:
        for (int g = 0; g < QK_SCALE_SLOTS; ++g) {
#pragma HLS UNROLL
          s[g] = qk_tree16(v + g * (QK_GROUP_MIN / 2));
        }
        acc[c] += qk_apply_scales(s, a, fmt ? 1 : spw);
      }
      if (c < build) {
        if (!fmt && c >= kProdCycles) {
          const int e2 = c - kProdCycles;
          const int b0 = (e2 % kAddGroups) * QK_BUILD_ADDS;
          const int e = e2 / kAddGroups;  // byte value: high nibble = even element
        gemv_build_pair:
          for (int q = 0; q < QK_BUILD_ADDS; ++q) {
#pragma HLS UNROLL
            const int b = b0 + q;
            tab[b][wr + e] = prod[2 * b][e >> 4] + prod[2 * b + 1][e & 15];
          }
        } else {
          // The same QK_BUILD_MULS multipliers: x*code (4-bit) or x*(1 + m/128) (bf16). A cycle's
          // products go to QK_BUILD_MULS different lanes: prod is partitioned by lane, one write
          // port each, and four writes to one lane's LUTRAM would hold this loop at II=4.
          const int lane = (c % (QK_LANES / QK_BUILD_MULS)) * QK_BUILD_MULS, j = c / (QK_LANES / QK_BUILD_MULS);
          const int m = c / kMantGroups, l0 = (c % kMantGroups) * QK_BUILD_MULS;
          const float mant = qk_f32(0x3F800000u | ((uint32_t)(m & 0x7F) << 16));  // 1 + m/128, exact
        gemv_build_mul:
          for (int q = 0; q < QK_BUILD_MULS; ++q) {
#pragma HLS UNROLL
            const float xa = xt[xw][fmt ? l0 + q : lane + q];
            const float ca = fmt ? mant : rom[j];
            const float p = xa * ca;
            if (fmt) tab[l0 + q][wr + m] = p;
            else prod[lane + q][j] = p;
          }
        }
      }
    }
  }

gemv_store_y:
  for (int i = 0; i < (rows + 15) / 16; ++i) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=512
#pragma HLS PIPELINE II=1
    qk_word_t b;
  gemv_store_y_lane:
    for (int l = 0; l < 16; ++l) {
#pragma HLS UNROLL
      qk_word_set_f32(b, l, acc[16 * i + l]);
    }
    y_out[i] = b;
  }
}

}  // namespace

extern "C" void qk_gemv_4bit(const qk_word_t* w, const qk_word_t* scales, const qk_word_t* x, const float* codebook,
                             const qk_word_t* y_in, qk_word_t* y_out, int rows, int tiles, int spw, int fmt) {
#pragma HLS INTERFACE m_axi port=w bundle=gmem0 offset=slave max_read_burst_length=64 num_read_outstanding=32
#pragma HLS INTERFACE m_axi port=scales bundle=gmem1 offset=slave max_read_burst_length=64
// x, the codebook and y are a few KB per call: they share one port.
#pragma HLS INTERFACE m_axi port=x bundle=gmem2 offset=slave
#pragma HLS INTERFACE m_axi port=codebook bundle=gmem2 offset=slave
#pragma HLS INTERFACE m_axi port=y_in bundle=gmem2 offset=slave
#pragma HLS INTERFACE m_axi port=y_out bundle=gmem2 offset=slave
#pragma HLS INTERFACE s_axilite port=rows
#pragma HLS INTERFACE s_axilite port=tiles
#pragma HLS INTERFACE s_axilite port=spw
#pragma HLS INTERFACE s_axilite port=fmt
#pragma HLS INTERFACE s_axilite port=return
  // Bounds the host guarantees (HLS also reads asserts as ranges).
  assert(rows >= 0 && rows <= QK_GEMV_MAX_ROWS && tiles >= 0);
  assert(fmt ? tiles * QK_BF16_LANES <= QK_GEMV_MAX_TILES * QK_LANES : tiles <= QK_GEMV_MAX_TILES);
  assert(fmt == 1 || spw == 1 || spw == 2 || spw == 4);
#pragma HLS DATAFLOW
  qk_stream<qk_word_t> ws("gemv_w");
  qk_stream<qk_scale4_t> ss("gemv_scales");
  qk_stream<qk_word_t> xs("gemv_x");
#pragma HLS STREAM variable=xs depth=16
#pragma HLS STREAM variable=ws depth=QK_PREFETCH_BEATS
#pragma HLS STREAM variable=ss depth=QK_PREFETCH_BEATS
#pragma HLS BIND_STORAGE variable=ws type=fifo impl=uram
#pragma HLS BIND_STORAGE variable=ss type=fifo impl=uram
  qk_read_words(w, ws, rows, tiles, 1);
  qk_gemv_scales(scales, ss, rows, tiles, spw, fmt);
  qk_read_x(x, xs, tiles, fmt);
  qk_gemv_core(ws, ss, xs, codebook, y_in, y_out, rows, tiles, spw, fmt);
}
