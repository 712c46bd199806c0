// One-lane "vector" operations with the interface of vec_avx2.h / vec_avx512.h, so that a
// kernel family written once for any width (attention_simd.h) also gives the scalar path.
#pragma once
#include <cstdint>

#include "norm_act_common.h"  // pow2_scalar

namespace qk {
namespace {

struct VecScalar {
  using Reg = float;
  static constexpr int kLanes = 1;
  static Reg set1(float x) { return x; }
  static Reg load(const float* p) { return *p; }
  static void store(float* p, Reg x) { *p = x; }
  static Reg add(Reg a, Reg b) { return a + b; }
  static Reg sub(Reg a, Reg b) { return a - b; }
  static Reg mul(Reg a, Reg b) { return a * b; }
  static Reg div(Reg a, Reg b) { return a / b; }
  static Reg fmadd(Reg a, Reg b, Reg c) { return a * b + c; }
  // the operand order of the SIMD min/max: the second operand when either is NaN
  static Reg min(Reg a, Reg b) { return a < b ? a : b; }
  static Reg max(Reg a, Reg b) { return a > b ? a : b; }
  static float hsum(Reg a) { return a; }
  static Reg scale_pow2(Reg p, Reg n) {
    if (n != n) return n;
    const int32_t ni = static_cast<int32_t>(n), e1 = ni >> 1;
    return p * pow2_scalar(e1) * pow2_scalar(ni - e1);
  }
};

}  // namespace
}  // namespace qk
