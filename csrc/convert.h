// Scalar dtype conversions shared by the kernels. Rounding is round-to-nearest-even,
// matching torch's Tensor.to() and bitsandbytes' CPU kernels.
#pragma once
#include <cstdint>
#include <cstring>

namespace qk {

static inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// IEEE half <-> float in integer arithmetic, bit for bit what _Float16 casts give, but
// without libgcc's soft-float helpers (__extendhfsf2 / __truncsfhf2: GCC 12 symbols that
// would pin a wheel to a new glibc/libgcc) and without F16C (the scalar path runs on any
// x86-64 CPU).
static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {  // Inf, or a NaN with its payload, made quiet as a conversion does
    bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Round to nearest, ties to even; overflow to Inf; NaN stays a quiet NaN keeping the top
// of its payload.
static inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u)
    return static_cast<uint16_t>(sign | (ax == 0x7f800000u ? 0x7c00u : 0x7e00u | ((ax >> 13) & 0x3ffu)));
  const int e = static_cast<int>(ax >> 23) - 127;
  if (e > 15) return static_cast<uint16_t>(sign | 0x7c00u);
  if (e >= -14) {  // a normal half; a rounding carry into the exponent is right (up to Inf)
    const uint32_t m = ax & 0x7fffffu, rest = m & 0x1fffu;
    uint32_t h = (static_cast<uint32_t>(e + 15) << 10) | (m >> 13);
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  if (e < -25) return static_cast<uint16_t>(sign);  // under half of the smallest subnormal
  // A subnormal half: the value in units of 2^-24 is m * 2^(e + 1), m with its implicit bit.
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const int shift = -e - 1;  // 14 .. 24
  const uint32_t halfway = 1u << (shift - 1), rest = m & ((1u << shift) - 1u);
  uint32_t h = m >> shift;
  if (rest > halfway || (rest == halfway && (h & 1u))) ++h;  // may carry into the smallest normal: right
  return static_cast<uint16_t>(sign | h);
}

}  // namespace qk
