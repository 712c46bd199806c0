// Bindings of the machine-limit probes (peak.h). Python's qlora_kernels.peak turns them
// into the table `qlora-kernels info --peak` prints and the benchmarks divide by.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "dispatch.h"
#include "peak.h"
#include "require.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

using Clock = std::chrono::steady_clock;

bool runnable(const std::string& isa) {
  const auto all = qk::supported_isas();
  return std::find(all.begin(), all.end(), isa) != all.end();
}

// Wall time of `body(slice)` for every slice 0..nthreads-1, a slice per thread. Slices,
// not thread ids: when OpenMP runs fewer threads than asked, the work is still all done
// and the rate it gives is the rate of the threads that ran, not nthreads times one's.
template <class F>
double timed_region(int nthreads, F body) {
  const auto t0 = Clock::now();
#pragma omp parallel for schedule(static, 1) num_threads(nthreads)
  for (int t = 0; t < nthreads; ++t) body(t);
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The work size whose region takes at least `target` seconds, judged on the faster of two
// runs: one run stalled by another process (a shared machine) stopped the doubling early
// and left every later region timing thread wake-ups rather than the work.
template <class Run>
int64_t sized(int64_t n, double target, Run run) {
  while (std::min(run(n), run(n)) < target && n < (int64_t(1) << 40)) n *= 2;
  return n;
}

volatile float g_sink;  // keeps the probes' results alive

double fma_peak_gflops(const std::string& isa, int nthreads, double min_seconds) {
  QK_REQUIRE(runnable(isa), "this CPU (or QLORA_KERNELS_ISA) does not run the '" + isa + "' path");
  QK_REQUIRE(nthreads >= 1 && min_seconds > 0, "nthreads must be >= 1 and min_seconds > 0");
  float (*chains)(int64_t, float) = qk::fma_chains_scalar;
  int64_t per_iter = qk::kPeakFlopsPerIterScalar;
#if defined(QK_X86)
  if (isa == "avx2") chains = qk::fma_chains_avx2, per_iter = qk::kPeakFlopsPerIterAvx2;
  if (isa == "avx512" || isa == "avx512vnni") chains = qk::fma_chains_avx512, per_iter = qk::kPeakFlopsPerIterAvx512;
#endif
  py::gil_scoped_release nogil;
  int64_t iters = 1 << 16;
  auto run = [&](int64_t n) {
    return timed_region(nthreads, [&](int t) { g_sink = chains(n, 1.0f + t); });
  };
  iters = sized(iters, min_seconds / 20, run);
  double best = 0, spent = 0;
  for (int rep = 0; rep < 5 || spent < min_seconds; ++rep) {
    const double s = run(iters);
    spent += s;
    best = std::max(best, double(iters) * per_iter * nthreads / s * 1e-9);
    if (rep > 50) break;
  }
  return best;
}

double read_bandwidth_gbs(int64_t bytes, int nthreads, double min_seconds) {
  QK_REQUIRE(bytes >= 4096 && bytes <= (int64_t(1) << 34), "bytes must be in [4 KiB, 16 GiB], got " +
                                                                 std::to_string(bytes));
  QK_REQUIRE(nthreads >= 1 && min_seconds > 0, "nthreads must be >= 1 and min_seconds > 0");
  float (*sum)(const float*, int64_t) = runnable("avx2") ? qk::read_sum_avx2 : qk::read_sum_scalar;
  // Each thread reads its own contiguous slice of whole 64-float lines, as a streaming
  // kernel splits its weights; the slices are first touched by their own thread.
  const int64_t lines = std::max<int64_t>(bytes / 256 / nthreads, 1);
  const int64_t per_thread = lines * 64;
  const int64_t n = per_thread * nthreads;
  std::unique_ptr<float, decltype(&std::free)> buf(
      static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(n) * sizeof(float))), &std::free);
  QK_REQUIRE(buf != nullptr, "cannot allocate " + std::to_string(n * 4) + " bytes");
  float* p = buf.get();
  py::gil_scoped_release nogil;
  timed_region(nthreads, [&](int t) { std::fill(p + t * per_thread, p + (t + 1) * per_thread, 1.0f); });
  auto passes = [&](int64_t reps) {
    return timed_region(nthreads, [&](int t) {
      float s = 0;
      for (int64_t r = 0; r < reps; ++r) s += sum(p + t * per_thread, per_thread);
      g_sink = s;
    });
  };
  passes(1);  // warm the level the buffer fits in
  // Repeat a slice enough times that a pass is far longer than starting the threads.
  const int64_t reps = sized(std::max<int64_t>(1, (int64_t(1) << 26) / (per_thread * 4)), min_seconds / 20, passes);
  auto pass = [&] { return passes(reps); };
  double best = 0, spent = 0;
  for (int rep = 0; rep < 5 || spent < min_seconds; ++rep) {
    const double s = pass();
    spent += s;
    best = std::max(best, double(n) * 4 * reps / s * 1e-9);
    if (rep > 50) break;
  }
  return best;
}

}  // namespace

void register_peak(py::module_& m) {
  m.def("fma_peak_gflops", &fma_peak_gflops, py::arg("isa"), py::arg("nthreads"), py::arg("min_seconds"),
        "Measured fp32 FMA throughput (GFLOP/s) of an ISA path's widest FMA (SSE2 mul+add for 'scalar') on "
        "nthreads threads: the best of repeated timed runs of independent FMA chains.");
  m.def("read_bandwidth_gbs", &read_bandwidth_gbs, py::arg("bytes"), py::arg("nthreads"), py::arg("min_seconds"),
        "Measured read bandwidth (GB/s) of a buffer of about `bytes` bytes split among nthreads threads, each "
        "reading its slice repeatedly (so the level the buffer fits in is the one measured).");
}
