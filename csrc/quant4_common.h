// Pieces of the 4-bit kernels shared by every ISA path: element loaders/storers and the
// scalar per-element rule. SIMD paths use these for block tails, so a tail element is
// encoded by exactly the code the scalar path runs.
#pragma once
#include <algorithm>
#include <cmath>

#include "convert.h"
#include "quant4.h"

namespace qk {

struct LoadF32 {
  static float at(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
};
struct LoadBF16 {
  static float at(const void* p, int64_t i) { return bf16_to_f32(static_cast<const uint16_t*>(p)[i]); }
};
struct LoadF16 {
  static float at(const void* p, int64_t i) { return f16_to_f32(static_cast<const uint16_t*>(p)[i]); }
};

struct StoreF32 {
  static void put(void* p, int64_t i, float v) { static_cast<float*>(p)[i] = v; }
};
struct StoreBF16 {
  static void put(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); }
};
struct StoreF16 {
  static void put(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = f32_to_f16(v); }
};

// Block scaling as bitsandbytes' default CPU kernel does it: full blocks multiply by the
// reciprocal of the floored absmax, the tail block divides by it, and only the tail
// stores the floored value (an all-zero full block keeps absmax 0).
struct BlockScale {
  float floored, inv, stored;
  bool tail;
  BlockScale(float amax, bool is_tail)
      : floored(std::max(amax, kAbsmaxFloor)), inv(1.0f / std::max(amax, kAbsmaxFloor)),
        stored(is_tail ? std::max(amax, kAbsmaxFloor) : amax), tail(is_tail) {}
  float scale(float v) const {
    const float s = tail ? v / floored : v * inv;
    return std::min(std::max(s, -1.f), 1.f);
  }
};

inline uint8_t bucket4(float s, const Quant4Tables& t) {
  int idx = 0;
  for (int k = 0; k < 15; ++k) idx += (t.bounds[k] < s);
  return t.order[idx];
}

// Encodes elements [i0, len) of a block (i0 even) starting at flat index `start`.
template <class L>
inline void quantize4_tail(const void* x, int64_t start, int64_t i0, int64_t len,
                           const BlockScale& sc, const Quant4Tables& t, uint8_t* packed) {
  for (int64_t i = i0; i < len; i += 2) {
    const float s0 = sc.scale(L::at(x, start + i));
    const float s1 = (i + 1 < len) ? sc.scale(L::at(x, start + i + 1)) : 0.f;
    packed[(start + i) / 2] = static_cast<uint8_t>((bucket4(s0, t) << 4) | bucket4(s1, t));
  }
}

template <class S>
inline void dequantize4_tail(const uint8_t* packed, float scale, const float* code, int64_t start,
                             int64_t i0, int64_t len, void* out) {
  for (int64_t i = start + i0; i < start + len; ++i) {
    const uint8_t byte = packed[i >> 1];
    S::put(out, i, code[(i & 1) ? (byte & 0x0f) : (byte >> 4)] * scale);
  }
}

// The first bad block wins: OpenMP max-reductions over (nblocks - b).
inline int64_t first_bad_block(int64_t reduced, int64_t nblocks) {
  return reduced < 0 ? -1 : nblocks - reduced;
}

}  // namespace qk
