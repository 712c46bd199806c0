#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace qk {
namespace {

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2:
#if defined(QK_X86)
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
      return false;
#endif
    case Isa::Avx512:
#if defined(QK_X86)
      return cpu_has(Isa::Avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
      return false;
#endif
    case Isa::Avx512Vnni:
#if defined(QK_X86)
      return cpu_has(Isa::Avx512) && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
#else
      return false;
#endif
  }
  return false;
}

bool compiled(Isa isa) {
#if defined(QK_X86)
  (void)isa;
  return true;
#else
  return isa == Isa::Scalar;
#endif
}

const Kernels kTable[] = {
    {quantize4_scalar, dequantize4_scalar},
#if defined(QK_X86)
    {quantize4_avx2, dequantize4_avx2},
    {quantize4_avx512, dequantize4_avx512},
    {quantize4_avx512, dequantize4_avx512},
#else
    {quantize4_scalar, dequantize4_scalar},
    {quantize4_scalar, dequantize4_scalar},
    {quantize4_scalar, dequantize4_scalar},
#endif
};

const Isa kAll[] = {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni};

Isa detect_best() {
  Isa best = Isa::Scalar;
  for (Isa isa : kAll)
    if (compiled(isa) && cpu_has(isa)) best = isa;
  return best;
}

std::string runnable_list() {
  std::string out;
  for (Isa isa : kAll)
    if (compiled(isa) && cpu_has(isa)) out += std::string(out.empty() ? "" : ", ") + isa_name(isa);
  return out;
}

// QLORA_KERNELS_ISA selects the path and caps the paths this process may use, as
// ATEN_CPU_CAPABILITY does for torch: with it set to scalar the extension behaves as on a
// CPU without AVX2, which is how CI covers that class of CPU on any machine. An unknown or
// unrunnable value is an error naming the variable, never a silent fallback.
Isa env_cap() {
  static const Isa cap = [] {
    const char* env = std::getenv("QLORA_KERNELS_ISA");
    if (!env || !*env) return detect_best();
    Isa isa = Isa::Scalar;
    bool known = false;
    for (Isa i : kAll)
      if (std::string(env) == isa_name(i)) isa = i, known = true;
    if (!known)
      throw std::invalid_argument(std::string("QLORA_KERNELS_ISA: unknown ISA path '") + env +
                                  "'; valid values on this CPU: " + runnable_list());
    if (!compiled(isa) || !cpu_has(isa))
      throw std::invalid_argument(std::string("QLORA_KERNELS_ISA=") + env +
                                  " is not available on this CPU/build; valid values on this CPU: " + runnable_list());
    return isa;
  }();
  return cap;
}

bool allowed(Isa isa) { return compiled(isa) && cpu_has(isa) && static_cast<int>(isa) <= static_cast<int>(env_cap()); }

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(env_cap())};
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Vnni: return "avx512vnni";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  for (Isa isa : kAll)
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("unknown ISA path '" + name + "'; expected one of: scalar, avx2, avx512, avx512vnni");
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (Isa isa : kAll)
    if (compiled(isa)) out.emplace_back(isa_name(isa));
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : kAll)
    if (allowed(isa)) out.emplace_back(isa_name(isa));
  return out;
}

std::string best_isa() { return isa_name(detect_best()); }

Isa current_isa() { return static_cast<Isa>(current().load()); }

void set_isa(const std::string& name) {
  const Isa isa = parse_isa(name);
  if (!compiled(isa)) throw std::invalid_argument("ISA path '" + name + "' was not compiled into this build");
  if (!cpu_has(isa)) throw std::invalid_argument("this CPU cannot run the '" + name + "' path");
  if (!allowed(isa))
    throw std::invalid_argument("QLORA_KERNELS_ISA=" + std::string(isa_name(env_cap())) + " caps this process at the '" +
                                isa_name(env_cap()) + "' path; '" + name + "' is above it");
  current().store(static_cast<int>(isa));
}

const Kernels& kernels() { return kTable[current().load()]; }

}  // namespace qk
