// Run-time choice of the ISA path: every CPU feature check of the extension is here.
// Detection uses cpuid (via the compiler builtins); QLORA_KERNELS_ISA=scalar|avx2|avx512|
// avx512vnni selects a path at import and caps the paths the process may use
// (supported_isas() and set_isa() stay below it); set_isa() switches at run time, so the
// test suite reaches every path the machine can execute.
#pragma once
#include <string>
#include <vector>

#include "quant4.h"

namespace qk {

// Avx512 (F+BW+VL+DQ) has its own fused-linear kernels and fp32 dequantization; the
// quantizer and the bf16/fp16 dequantization reuse the AVX2 kernels on it. Avx512Vnni
// (Avx512 + VNNI + VBMI) is Avx512 plus the int8-compute kernels that need those two: a
// level of its own, as oneDNN's avx512_core_vnni, so that capping at avx512 reaches the
// int8 fallbacks on a VNNI CPU and `info` names the path the int8 kernels take.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3 };

const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // throws std::invalid_argument
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();  // compiled, runnable on this CPU, not above QLORA_KERNELS_ISA
std::string best_isa();
Isa current_isa();
void set_isa(const std::string& name);  // throws std::invalid_argument

struct Kernels {
  Quantize4Fn quantize4;
  Dequantize4Fn dequantize4;
};
const Kernels& kernels();

// Whether the current path includes a level (paths are ordered: each includes the ones below).
inline bool isa_at_least(Isa isa) { return static_cast<int>(current_isa()) >= static_cast<int>(isa); }

// The entry of a per-ISA table for the current path (builds without x86 pass the scalar
// entry three times); Avx512Vnni takes the avx512 entry.
template <class T>
const T& for_current_isa(const T& scalar, const T& avx2, const T& avx512) {
  switch (current_isa()) {
    case Isa::Avx2: return avx2;
    case Isa::Avx512:
    case Isa::Avx512Vnni: return avx512;
    default: return scalar;
  }
}

// The table a per-ISA factory builds, for the current path, built on the first use of that
// path. The avx2/avx512 factories are compiled for their ISA, and the compiler uses its
// instructions even to fill a table of pointers (vinserti128 in attention_avx2(): SIGILL
// on an emulated IvyBridge when all three tables were built at once): so a factory runs
// only once its path is selected, never on a CPU without that ISA.
template <class T, T (*Scalar)(), T (*Avx2)(), T (*Avx512)()>
const T& table_for_current_isa() {
  switch (current_isa()) {
    case Isa::Avx2: {
      static const T avx2 = Avx2();
      return avx2;
    }
    case Isa::Avx512:
    case Isa::Avx512Vnni: {
      static const T avx512 = Avx512();
      return avx512;
    }
    default: {
      static const T scalar = Scalar();
      return scalar;
    }
  }
}

}  // namespace qk
