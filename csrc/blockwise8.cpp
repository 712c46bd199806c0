// 8-bit blockwise quantization with a sorted 256-entry map, the rule bitsandbytes'
// CPU kernel applies for double quantization: the block's |x| maximum scales by its
// reciprocal, the scaled value picks one of 65,536 equal bins on [-1, 1], and a
// table maps each bin to the code whose midpoint interval holds the bin's left edge.
// (This is not the exact nearest code near 0, where the dynamic map is denser than the
// bins; matching it is what keeps nested absmax bytes identical.) An all-zero block
// encodes as code 0 with absmax 0. Scalar only: it runs on the absmax vector.
#include <algorithm>
#include <cmath>
#include <vector>

#include "quant4.h"

namespace qk {
namespace {

constexpr int kBins = 65536;

std::vector<uint8_t> bin_table(const float* code) {
  float mids[255];
  for (int i = 0; i < 255; ++i) mids[i] = 0.5f * (code[i] + code[i + 1]);
  std::vector<uint8_t> table(kBins);
  int c = 0;
  for (int i = 0; i < kBins; ++i) {
    const float left = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kBins - 1);
    while (c < 255 && mids[c] < left) ++c;
    table[i] = static_cast<uint8_t>(c);
  }
  return table;
}

}  // namespace

void quantize8_blockwise(const float* x, int64_t n, int64_t blocksize, const float* code,
                         uint8_t* out, float* absmax) {
  const std::vector<uint8_t> table = bin_table(code);
  for (int64_t start = 0, b = 0; start < n; start += blocksize, ++b) {
    const int64_t end = std::min(n, start + blocksize);
    float amax = 0.f;
    for (int64_t i = start; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
    absmax[b] = amax;
    if (amax == 0.f) {
      std::fill(out + start, out + end, uint8_t(0));
      continue;
    }
    const float inv = 1.0f / amax;
    for (int64_t i = start; i < end; ++i) {
      const float v = std::min(std::max(x[i] * inv, -1.0f), 1.0f);
      const float pos = (v + 1.0f) * 0.5f * static_cast<float>(kBins - 1) + 0.5f;
      out[i] = table[static_cast<uint16_t>(pos)];
    }
  }
}

void dequantize8_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                           int64_t blocksize, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = code[q[i]] * absmax[i / blocksize];
}

}  // namespace qk
