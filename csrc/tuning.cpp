#include "tuning.h"

#include <atomic>
#include <stdexcept>
#include <string>

namespace qk {
namespace {

constexpr int kFields = 6;

// Avx512Vnni runs Avx512's fp32 kernels: one entry for both.
int slot(Isa isa) { return isa == Isa::Avx512Vnni ? static_cast<int>(Isa::Avx512) : static_cast<int>(isa); }

// One atomic per field: a reader racing set_tuning() may see old and new fields mixed,
// and every field is valid on its own, so any mix is a valid tuning.
std::atomic<int64_t>* table() {
  static std::atomic<int64_t> t[4][kFields];
  static const bool init = [] {
    for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512}) {
      const Tuning d = default_tuning(isa);
      const int64_t v[kFields] = {d.kc, d.nc, d.mc, d.gemv_rows_forward, d.gemv_rows_backward, d.gemv_decode};
      for (int f = 0; f < kFields; ++f) t[slot(isa)][f].store(v[f]);
    }
    return true;
  }();
  (void)init;
  return &t[0][0];
}

void check(const char* field, int64_t v, int64_t lo, int64_t hi, int64_t multiple) {
  if (v < lo || v > hi || v % multiple != 0)
    throw std::invalid_argument("tuning: " + std::string(field) + "=" + std::to_string(v) + " is out of range; it takes " +
                                (multiple > 1 ? "a multiple of " + std::to_string(multiple) + " " : std::string("a value ")) +
                                "in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

}  // namespace

Tuning default_tuning(Isa isa) {
  // kc: one KC x NR micro-panel of B in L1 (16 KiB AVX2, 32 KiB AVX-512); mc: the MC x KC
  // block of packed A (120 KiB) in L2; nc: the KC x NC panel (512 KiB / 1 MiB) in L2/L3.
  // GEMV rows: where the streaming GEMV's repeated passes over x cost more than decoding
  // a panel once (4096x4096, blocksize 64, Zen 5); the 512-bit panel kernel is so fast
  // that the backward GEMV pays off only for the tiniest batches there.
  switch (isa) {
    case Isa::Avx2: return {256, 512, 120, 8, 8, 0};
    case Isa::Avx512:
    case Isa::Avx512Vnni: return {256, 1024, 120, 6, 3, 0};
    default: return {256, 512, 120, 0, 0, 0};  // the scalar path has no loop nest or GEMV: unused
  }
}

Tuning tuning(Isa isa) {
  const std::atomic<int64_t>* t = table() + slot(isa) * kFields;
  return {t[0].load(std::memory_order_relaxed), t[1].load(std::memory_order_relaxed),
          t[2].load(std::memory_order_relaxed), t[3].load(std::memory_order_relaxed),
          t[4].load(std::memory_order_relaxed), t[5].load(std::memory_order_relaxed)};
}

void set_tuning(Isa isa, const Tuning& t) {
  check("kc", t.kc, 64, 1024, 64);
  check("nc", t.nc, 64, 4096, 64);
  check("mc", t.mc, 1, 2048, 1);
  check("gemv_rows_forward", t.gemv_rows_forward, 0, 16, 1);
  check("gemv_rows_backward", t.gemv_rows_backward, 0, 16, 1);
  check("gemv_decode", t.gemv_decode, 0, 1, 1);
  std::atomic<int64_t>* dst = table() + slot(isa) * kFields;
  const int64_t v[kFields] = {t.kc, t.nc, t.mc, t.gemv_rows_forward, t.gemv_rows_backward, t.gemv_decode};
  for (int f = 0; f < kFields; ++f) dst[f].store(v[f], std::memory_order_relaxed);
}

}  // namespace qk
