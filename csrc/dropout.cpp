// Dropout masks of LoRA's input branch (functional.py): out[i] = 1 / (1 - p) with
// probability 1 - p, else 0, as torch's bernoulli_(1 - p).div_(1 - p) draws them.
//
// Why native: torch's CPU bernoulli_ draws serially from one mt19937 at ~5 ns an element;
// with a mask per adapted projection that was 16% of a micro-batch of the default SmolLM2
// finetune. Here element i's draw is a pure function of (seed, i): SplitMix64's output for
// the state seed + (i + 1) * gamma (Steele, Lea and Flood, "Fast splittable pseudorandom
// number generators", OOPSLA 2014; the outputs pass TestU01's BigCrush). So the mask is the
// same for any thread count or chunking, and a seed drawn from torch's generator keeps a run
// reproducible under torch.manual_seed. The top 32 bits are compared with (1 - p) * 2^32.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "require.h"

namespace py = pybind11;

namespace {

constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ULL;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

void dropout_mask(uintptr_t out, int64_t numel, double p, uint64_t seed, int nthreads) {
  QK_REQUIRE(std::isfinite(p) && p >= 0.0 && p < 1.0, "dropout p must be in [0, 1), got " + std::to_string(p));
  QK_REQUIRE(numel >= 0, "numel must be >= 0");
  QK_REQUIRE(out != 0 || numel == 0, "null data pointer");
  float* o = ptr<float>(out);
  // torch divides by the float nearest 1 - p; so does this
  const float keep_value = 1.0f / static_cast<float>(1.0 - p);
  const uint64_t threshold = static_cast<uint64_t>(std::llround((1.0 - p) * 4294967296.0));
  // below ~64K elements a thread costs more to wake than it saves
  const int T = static_cast<int>(std::clamp<int64_t>(numel >> 16, 1, std::max(nthreads, 1)));
#pragma omp parallel for schedule(static) num_threads(T)
  for (int64_t i = 0; i < numel; ++i)
    o[i] = (splitmix64(seed + static_cast<uint64_t>(i + 1) * kGamma) >> 32) < threshold ? keep_value : 0.0f;
}

}  // namespace

void register_dropout(py::module_& m) {
  m.def("dropout_mask", &dropout_mask, py::call_guard<py::gil_scoped_release>(), py::arg("out"), py::arg("numel"),
        py::arg("p"), py::arg("seed"), py::arg("nthreads"),
        "Fills numel fp32 values at out with 1/(1-p) (probability 1-p) or 0, element i a function of (seed, i).");
}
