// Whole operations as a board's host program would issue them: each split into kernel
// calls that fit the on-chip buffers, with partial sums chained through y_in/y_out.
#include <algorithm>
#include <stdexcept>

#include "qk_host.h"

namespace qk_host {
namespace {

// GEMM/LoRA calls replay the weight stream once per tile of rows; in C-simulation a
// stream holds everything its producer wrote, so calls are kept to a few row tiles.
constexpr int64_t kMaxMtilesPerCall = 8;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Beats of x[m0 .. m0 + mt*TM) restricted to columns [c0, c0 + cols), zero-padded, laid
// out [m-tile][TM][cols] -- the layout every engine here reads row tiles in.
Beats row_tile_beats(const float* x, int64_t M, int64_t ld, int64_t m0, int64_t mt, int64_t tm, int64_t c0,
                     int64_t cols, int64_t valid_cols) {
  std::vector<float> buf(size_t(mt * tm * cols), 0.0f);
  for (int64_t i = 0; i < mt * tm; ++i) {
    const int64_t m = m0 + i;
    if (m >= M) break;
    for (int64_t c = 0; c < std::min(cols, valid_cols - c0); ++c) buf[size_t(i * cols + c)] = x[m * ld + c0 + c];
  }
  return beats_from_floats(buf.data(), int64_t(buf.size()));
}

void check_linear(int64_t M, int64_t K, int64_t N, int64_t blocksize) {
  if (M < 0 || K < 0 || N < 0) throw std::invalid_argument("negative size");
  scales_per_beat(blocksize);
}

// W [N, K] expanded by the decode unit (for blocks that straddle rows).
std::vector<float> dense_weight(const uint8_t* packed, const float* absmax, const float* code, int64_t N, int64_t K,
                                int64_t blocksize) {
  std::vector<float> w(size_t(N * K));
  dequantize_4bit(packed, absmax, code, N * K, blocksize, w.data());
  return w;
}

// out[M, R] = x[M, K] A[R, K]^T through the LoRA down engine, 64 rows of A per call.
void dense_xat(const float* x, int64_t M, int64_t K, const float* a, int64_t R, float* out) {
  std::vector<float> u;
  for (int64_t r0 = 0; r0 < R; r0 += QK_LORA_MAX_R) {
    const int64_t r = std::min<int64_t>(QK_LORA_MAX_R, R - r0);
    u.assign(size_t(M * r), 0.0f);
    lora_down(x, M, K, a + r0 * K, r, u.data());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < r; ++j) out[m * R + r0 + j] = u[size_t(m * r + j)];
  }
}

}  // namespace

void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                     float* out) {
  if (n <= 0) return;
  if (blocksize < QK_GROUP_MIN || blocksize % QK_DECODE_LANES) throw std::invalid_argument("blocksize");
  const Beats in = beats_from_bytes(packed, (n + 1) / 2);
  Beats res(size_t(ceil_div(n, QK_DECODE_LANES)));
  qk_decode_4bit(in.data(), absmax, code, res.data(), int(n), int(blocksize));
  floats_from_beats(res, out, n);
}

void absmax_dq(const uint8_t* q, const float* absmax2, const float* dmap, float offset, int64_t n,
               int64_t blocksize2, float* out) {
  if (n <= 0) return;
  if (blocksize2 < QK_DECODE_LANES || blocksize2 % QK_DECODE_LANES) throw std::invalid_argument("blocksize2");
  const Beats in = beats_from_bytes(q, n);
  Beats res(size_t(ceil_div(n, QK_DECODE_LANES)));
  qk_absmax_dq(in.data(), absmax2, dmap, offset, res.data(), int(n), int(blocksize2));
  floats_from_beats(res, out, n);
}

void linear_4bit(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* absmax, const float* code,
                 int64_t N, int64_t blocksize, const float* bias, float* y) {
  check_linear(M, K, N, blocksize);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) y[m * N + n] = bias ? bias[n] : 0.0f;
  if (M == 0 || N == 0 || K == 0) return;
  if (K % blocksize) {
    const std::vector<float> w = dense_weight(packed, absmax, code, N, K, blocksize);
    std::vector<float> prod(size_t(M * N));
    dense_xat(x, M, K, w.data(), N, prod.data());
    for (int64_t i = 0; i < M * N; ++i) y[i] += prod[size_t(i)];
    return;
  }
  const int64_t T = ceil_div(K, QK_LANES);
  if (M == 1) {
    for (int64_t n0 = 0; n0 < N; n0 += QK_GEMV_MAX_ROWS) {
      const int64_t n1 = std::min<int64_t>(N, n0 + QK_GEMV_MAX_ROWS);
      Beats yb = beats_from_floats(y + n0, n1 - n0);
      for (int64_t t0 = 0; t0 < T; t0 += QK_GEMV_MAX_TILES) {
        const int64_t t1 = std::min<int64_t>(T, t0 + QK_GEMV_MAX_TILES);
        const Tiled w = pack_tiled(packed, absmax, N, K, blocksize, n0, n1, t0, t1);
        const Beats xb = row_tile_beats(x, 1, K, 0, 1, 1, t0 * QK_LANES, (t1 - t0) * QK_LANES, K);
        Beats out(yb.size());
        qk_gemv_4bit(w.words.data(), w.scales.data(), xb.data(), code, yb.data(), out.data(), w.rows, w.tiles, w.spw,
                     0);
        yb.swap(out);
      }
      floats_from_beats(yb, y + n0, n1 - n0);
    }
    return;
  }
  const int64_t tm = QK_GEMM_TM;
  for (int64_t n0 = 0; n0 < N; n0 += QK_GEMM_MAX_ROWS) {
    const int64_t n1 = std::min<int64_t>(N, n0 + QK_GEMM_MAX_ROWS), rows = n1 - n0, rpad = ceil_div(rows, 16) * 16;
    for (int64_t t0 = 0; t0 < T; t0 += QK_GEMM_MAX_TILES) {
      const int64_t t1 = std::min<int64_t>(T, t0 + QK_GEMM_MAX_TILES), tiles = t1 - t0;
      const Tiled w = pack_tiled(packed, absmax, N, K, blocksize, n0, n1, t0, t1);
      for (int64_t m0 = 0; m0 < M; m0 += tm * kMaxMtilesPerCall) {
        const int64_t mt = std::min<int64_t>(kMaxMtilesPerCall, ceil_div(M - m0, tm));
        // x layout [mt][t][TM][128]: one row-tile block per 128-column tile.
        Beats xb;
        for (int64_t i = 0; i < mt; ++i)
          for (int64_t t = t0; t < t1; ++t) {
            const Beats part = row_tile_beats(x, M, K, m0 + i * tm, 1, tm, t * QK_LANES, QK_LANES, K);
            xb.insert(xb.end(), part.begin(), part.end());
          }
        const Beats yb = row_tile_beats(y, M, N, m0, mt, tm, n0, rpad, N);
        Beats out(yb.size());
        qk_gemm_4bit(w.words.data(), w.scales.data(), xb.data(), code, yb.data(), out.data(), int(rows), int(tiles),
                     w.spw, int(mt));
        std::vector<float> f(size_t(mt * tm * rpad));
        floats_from_beats(out, f.data(), int64_t(f.size()));
        for (int64_t i = 0; i < mt * tm && m0 + i < M; ++i)
          for (int64_t n = 0; n < rows; ++n) y[(m0 + i) * N + n0 + n] = f[size_t(i * rpad + n)];
      }
    }
  }
}

void linear_4bit_grad_input(const float* dy, int64_t M, int64_t N, const uint8_t* packed, const float* absmax,
                            const float* code, int64_t K, int64_t blocksize, float* dx) {
  check_linear(M, K, N, blocksize);
  std::fill(dx, dx + M * K, 0.0f);
  if (M == 0 || N == 0 || K == 0) return;
  if (K % blocksize) {
    const std::vector<float> w = dense_weight(packed, absmax, code, N, K, blocksize);
    std::vector<float> wt(size_t(K * N));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) wt[size_t(k * N + n)] = w[size_t(n * K + k)];
    dense_xat(dy, M, N, wt.data(), K, dx);
    return;
  }
  const int64_t T = ceil_div(K, QK_LANES), tm = QK_GEMM_TM;
  for (int64_t n0 = 0; n0 < N; n0 += QK_GEMM_MAX_ROWS) {
    const int64_t n1 = std::min<int64_t>(N, n0 + QK_GEMM_MAX_ROWS), rows = n1 - n0, rpad = ceil_div(rows, 16) * 16;
    for (int64_t t0 = 0; t0 < T; t0 += QK_GEMM_MAX_TILES) {
      const int64_t t1 = std::min<int64_t>(T, t0 + QK_GEMM_MAX_TILES);
      const Tiled w = pack_tiled(packed, absmax, N, K, blocksize, n0, n1, t0, t1);
      for (int64_t m0 = 0; m0 < M; m0 += tm * kMaxMtilesPerCall) {
        const int64_t mt = std::min<int64_t>(kMaxMtilesPerCall, ceil_div(M - m0, tm));
        const Beats dyb = row_tile_beats(dy, M, N, m0, mt, tm, n0, rpad, N);
        Beats dxb;
        for (int64_t i = 0; i < mt; ++i)
          for (int64_t t = t0; t < t1; ++t) {
            const Beats part = row_tile_beats(dx, M, K, m0 + i * tm, 1, tm, t * QK_LANES, QK_LANES, K);
            dxb.insert(dxb.end(), part.begin(), part.end());
          }
        Beats out(dxb.size());
        qk_gemm_4bit_t(w.words.data(), w.scales.data(), dyb.data(), code, dxb.data(), out.data(), int(rows),
                       int(t1 - t0), w.spw, int(mt));
        std::vector<float> f(size_t(out.size() * 16));
        floats_from_beats(out, f.data(), int64_t(f.size()));
        // f is [mt][tile][TM][128]
        for (int64_t i = 0; i < mt; ++i)
          for (int64_t t = t0; t < t1; ++t)
            for (int64_t m = 0; m < tm && m0 + i * tm + m < M; ++m)
              for (int64_t l = 0; l < QK_LANES && t * QK_LANES + l < K; ++l)
                dx[(m0 + i * tm + m) * K + t * QK_LANES + l] =
                    f[size_t(((i * (t1 - t0) + (t - t0)) * tm + m) * QK_LANES + l)];
      }
    }
  }
}

void gemv_bf16(const uint16_t* w, int64_t N, int64_t K, const float* x, float* y) {
  const int64_t T = ceil_div(K, QK_BF16_LANES), max_tiles = QK_GEMV_MAX_TILES * QK_LANES / QK_BF16_LANES;
  for (int64_t n0 = 0; n0 < N; n0 += QK_GEMV_MAX_ROWS) {
    const int64_t n1 = std::min<int64_t>(N, n0 + QK_GEMV_MAX_ROWS);
    std::vector<float> zero(size_t(n1 - n0), 0.0f);
    Beats yb = beats_from_floats(zero.data(), n1 - n0);
    for (int64_t t0 = 0; t0 < T; t0 += max_tiles) {
      const int64_t t1 = std::min<int64_t>(T, t0 + max_tiles);
      const Beats wb = pack_bf16_tiled(w, N, K, n0, n1, t0, t1);
      const Beats xb = row_tile_beats(x, 1, K, 0, 1, 1, t0 * QK_BF16_LANES, (t1 - t0) * QK_BF16_LANES, K);
      Beats out(yb.size());
      qk_gemv_4bit(wb.data(), nullptr, xb.data(), nullptr, yb.data(), out.data(), int(n1 - n0), int(t1 - t0), 1, 1);
      yb.swap(out);
    }
    floats_from_beats(yb, y + n0, n1 - n0);
  }
}

void lora_down(const float* x, int64_t M, int64_t K, const float* a, int64_t r, float* u) {
  if (r < 1 || r > QK_LORA_MAX_R) throw std::invalid_argument("lora_down: rank must be in [1, 64]");
  const int64_t kc = ceil_div(K, QK_LORA_LANES), tm = QK_LORA_TM;
  // A layout [kc][r][64]
  Beats ab;
  for (int64_t c = 0; c < kc; ++c) {
    const Beats part = row_tile_beats(a, r, K, 0, 1, r, c * QK_LORA_LANES, QK_LORA_LANES, K);
    ab.insert(ab.end(), part.begin(), part.end());
  }
  for (int64_t m0 = 0; m0 < M; m0 += tm * kMaxMtilesPerCall) {
    const int64_t mt = std::min<int64_t>(kMaxMtilesPerCall, ceil_div(M - m0, tm));
    Beats xb;  // [mt][kc][TM][64]
    for (int64_t i = 0; i < mt; ++i)
      for (int64_t c = 0; c < kc; ++c) {
        const Beats part = row_tile_beats(x, M, K, m0 + i * tm, 1, tm, c * QK_LORA_LANES, QK_LORA_LANES, K);
        xb.insert(xb.end(), part.begin(), part.end());
      }
    Beats ub(size_t(mt * tm * 4));
    qk_lora_down(xb.data(), ab.data(), ub.data(), int(mt), int(kc), int(r));
    std::vector<float> f(ub.size() * 16);
    floats_from_beats(ub, f.data(), int64_t(f.size()));
    for (int64_t i = 0; i < mt * tm && m0 + i < M; ++i)
      for (int64_t j = 0; j < r; ++j) u[(m0 + i) * r + j] = f[size_t(i * QK_LORA_MAX_R + j)];
  }
}

void lora_up(const float* u, int64_t M, int64_t r, const float* b, int64_t N, float scaling, const float* y_in,
             float* y) {
  if (r < 1 || r > QK_LORA_MAX_R) throw std::invalid_argument("lora_up: rank must be in [1, 64]");
  const int64_t tm = QK_LORA_TM;
  const Beats bb = row_tile_beats(b, N, r, 0, 1, N, 0, QK_LORA_MAX_R, r);  // [n][64]
  for (int64_t m0 = 0; m0 < M; m0 += tm * kMaxMtilesPerCall) {
    const int64_t mt = std::min<int64_t>(kMaxMtilesPerCall, ceil_div(M - m0, tm));
    const Beats ub = row_tile_beats(u, M, r, m0, mt, tm, 0, QK_LORA_MAX_R, r);  // [mt][TM][64]
    std::vector<float> yt(size_t(mt * N * tm), 0.0f);                           // [mt][n][TM]
    for (int64_t i = 0; i < mt; ++i)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < tm && m0 + i * tm + m < M; ++m)
          yt[size_t((i * N + n) * tm + m)] = y_in[(m0 + i * tm + m) * N + n];
    const Beats yb = beats_from_floats(yt.data(), int64_t(yt.size()));
    Beats out(yb.size());
    qk_lora_up(ub.data(), bb.data(), yb.data(), out.data(), int(mt), int(N), scaling);
    floats_from_beats(out, yt.data(), int64_t(yt.size()));
    for (int64_t i = 0; i < mt; ++i)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < tm && m0 + i * tm + m < M; ++m)
          y[(m0 + i * tm + m) * N + n] = yt[size_t((i * N + n) * tm + m)];
  }
}

}  // namespace qk_host
