// Device layouts: bitsandbytes' packed weight -> the tiled beats the engines stream.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "qk_host.h"

namespace qk_host {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

qk_word_t zero_word() {
  qk_word_t w;
  for (int i = 0; i < QK_WORD_BITS / 32; ++i) qk_set_u32(w, i, 0);
  return w;
}

qk_word_t word_from_bytes(const uint8_t* b) {
  qk_word_t w;
  for (int i = 0; i < QK_WORD_BITS / 32; ++i)
    qk_set_u32(w, i, uint32_t(b[4 * i]) | uint32_t(b[4 * i + 1]) << 8 | uint32_t(b[4 * i + 2]) << 16 |
                         uint32_t(b[4 * i + 3]) << 24);
  return w;
}

// Code of element e of the flattened weight: byte e/2, even e in the high nibble.
inline unsigned nibble(const uint8_t* packed, int64_t e) {
  const uint8_t b = packed[e >> 1];
  return (e & 1) ? (b & 0xFu) : (b >> 4);
}

}  // namespace

Beats beats_from_floats(const float* src, int64_t n) {
  Beats out(ceil_div(n, 16), zero_word());
  for (int64_t i = 0; i < n; ++i) qk_word_set_f32(out[i >> 4], int(i & 15), src[i]);
  return out;
}

Beats beats_from_bytes(const uint8_t* src, int64_t n) {
  Beats out(ceil_div(n, QK_WORD_BYTES), zero_word());
  uint8_t buf[QK_WORD_BYTES];
  for (size_t w = 0; w < out.size(); ++w) {
    const int64_t off = int64_t(w) * QK_WORD_BYTES;
    const int64_t len = std::min<int64_t>(QK_WORD_BYTES, n - off);
    std::memset(buf, 0, sizeof buf);
    std::memcpy(buf, src + off, size_t(len));
    out[w] = word_from_bytes(buf);
  }
  return out;
}

void floats_from_beats(const Beats& b, float* dst, int64_t n) {
  if (int64_t(b.size()) * 16 < n) throw std::logic_error("floats_from_beats: too few beats");
  for (int64_t i = 0; i < n; ++i) dst[i] = qk_word_f32(b[i >> 4], int(i & 15));
}

int scales_per_beat(int64_t blocksize) {
  if (blocksize < QK_GROUP_MIN || (blocksize & (blocksize - 1)))
    throw std::invalid_argument("the HLS engines need a power-of-two blocksize >= 32");
  return int(QK_LANES / std::min<int64_t>(blocksize, QK_LANES));
}

Tiled pack_tiled(const uint8_t* packed, const float* absmax, int64_t N, int64_t K, int64_t blocksize, int64_t n0,
                 int64_t n1, int64_t t0, int64_t t1) {
  if (K % blocksize) throw std::invalid_argument("pack_tiled: K must be a multiple of the blocksize");
  if (n0 < 0 || n1 > N || n0 > n1 || t0 < 0 || t1 > ceil_div(K, QK_LANES) || t0 > t1)
    throw std::invalid_argument("pack_tiled: row or tile range out of bounds");
  Tiled t;
  t.rows = int(n1 - n0);
  t.tiles = int(t1 - t0);
  t.spw = scales_per_beat(blocksize);
  const int64_t words = int64_t(t.rows) * t.tiles;
  t.words.resize(size_t(words));
  std::vector<float> sc(size_t(words * t.spw), 0.0f);
  uint8_t buf[QK_WORD_BYTES];
  for (int64_t tt = t0; tt < t1; ++tt) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t idx = (tt - t0) * t.rows + (n - n0);
      std::memset(buf, 0, sizeof buf);
      const int64_t kend = std::min<int64_t>(QK_LANES, K - tt * QK_LANES);
      for (int64_t i = 0; i < kend; ++i) {
        const unsigned c = nibble(packed, n * K + tt * QK_LANES + i);
        buf[i >> 1] |= uint8_t((i & 1) ? c : c << 4);
      }
      t.words[size_t(idx)] = word_from_bytes(buf);
      for (int g = 0; g < t.spw; ++g) {
        const int64_t col = tt * QK_LANES + g * (QK_LANES / t.spw);
        if (col < K) sc[size_t(idx * t.spw + g)] = absmax[(n * K + col) / blocksize];
      }
    }
  }
  t.scales = beats_from_floats(sc.data(), int64_t(sc.size()));
  return t;
}

Beats pack_bf16_tiled(const uint16_t* w, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t t0, int64_t t1) {
  if (n0 < 0 || n1 > N || n0 > n1 || t0 < 0 || t1 > ceil_div(K, QK_BF16_LANES) || t0 > t1)
    throw std::invalid_argument("pack_bf16_tiled: row or tile range out of bounds");
  const int64_t rows = n1 - n0;
  Beats out(size_t(rows * (t1 - t0)), zero_word());
  for (int64_t tt = t0; tt < t1; ++tt)
    for (int64_t n = n0; n < n1; ++n) {
      qk_word_t& b = out[size_t((tt - t0) * rows + (n - n0))];
      for (int i = 0; i < QK_BF16_LANES; ++i) {
        const int64_t k = tt * QK_BF16_LANES + i;
        const uint32_t h = k < K ? w[n * K + k] : 0u;
        qk_set_u32(b, i >> 1, qk_u32(b, i >> 1) | (h << (16 * (i & 1))));
      }
    }
  return out;
}

}  // namespace qk_host
