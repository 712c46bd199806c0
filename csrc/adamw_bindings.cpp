// Binding of the multi-tensor fused AdamW. Python passes, per tensor, the data pointers of
// (param, grad, exp_avg, exp_avg_sq), its element count and its step; one call updates
// the whole list: the tensors are cut into fixed chunks and the chunks of all tensors are
// shared among the OpenMP threads, so many small adapter tensors cost one parallel region.
// Nothing is trusted: counts must agree, pointers must be aligned and non-null, and no
// written range may overlap any other range (a grad may alias another grad).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adamw.h"
#include "dispatch.h"
#include "require.h"

namespace py = pybind11;

namespace qk {

AdamWRangeFn adamw_kernel() {
  switch (current_isa()) {
#if defined(QK_X86)
    case Isa::Avx2: return adamw_range_avx2;
    case Isa::Avx512:
    case Isa::Avx512Vnni: return adamw_range_avx512;
#endif
    default: return adamw_range_scalar;
  }
}

}  // namespace qk

namespace {

using Ptrs = std::vector<uintptr_t>;

// 16K floats (64 KiB per array): big enough that the loop overhead vanishes, small
// enough that a 2-thread split of a few MB stays balanced.
constexpr int64_t kChunk = int64_t(1) << 14;

struct Range {
  uintptr_t begin, end;
  bool written;
  size_t tensor;
};

void check_no_overlap(std::vector<Range> r) {
  std::sort(r.begin(), r.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  uintptr_t end_all = 0, end_written = 0;
  size_t t_all = 0, t_written = 0;
  for (const Range& x : r) {
    QK_REQUIRE(x.begin >= end_written, "tensor " + std::to_string(x.tensor) + " overlaps the param/exp_avg/exp_avg_sq of tensor " +
                                        std::to_string(t_written) + " (the update would race with itself)");
    QK_REQUIRE(!x.written || x.begin >= end_all, "the param/exp_avg/exp_avg_sq of tensor " + std::to_string(x.tensor) +
                                                  " overlaps an input of tensor " + std::to_string(t_all));
    if (x.end > end_all) end_all = x.end, t_all = x.tensor;
    if (x.written && x.end > end_written) end_written = x.end, t_written = x.tensor;
  }
}

struct Work {
  size_t tensor;
  int64_t begin, end;
};

void adamw_step(const Ptrs& params, const Ptrs& grads, const Ptrs& exp_avgs, const Ptrs& exp_avg_sqs,
                const std::vector<int64_t>& numels, const std::vector<double>& steps, double lr, double beta1,
                double beta2, double eps, double weight_decay, bool maximize, int nthreads) {
  const size_t n = params.size();
  QK_REQUIRE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && numels.size() == n &&
              steps.size() == n,
          "params, grads, exp_avgs, exp_avg_sqs, numels and steps must have the same length");
  QK_REQUIRE(std::isfinite(lr) && std::isfinite(beta1) && std::isfinite(beta2) && std::isfinite(eps) &&
              std::isfinite(weight_decay),
          "lr, betas, eps and weight_decay must be finite");
  QK_REQUIRE(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "betas must be in [0, 1)");
  std::vector<Range> ranges;
  std::vector<qk::AdamWCoeffs> coeffs(n);
  std::vector<Work> work;
  for (size_t t = 0; t < n; ++t) {
    const int64_t len = numels[t];
    QK_REQUIRE(len >= 0 && len <= (int64_t(1) << 40), "numels[" + std::to_string(t) + "] is out of range");
    QK_REQUIRE(steps[t] >= 1 && std::isfinite(steps[t]), "steps[" + std::to_string(t) + "] must be >= 1");
    if (len == 0) continue;
    const uintptr_t ptrs[4] = {params[t], grads[t], exp_avgs[t], exp_avg_sqs[t]};
    for (int k = 0; k < 4; ++k) {
      QK_REQUIRE(ptrs[k] != 0, "tensor " + std::to_string(t) + ": null data pointer");
      QK_REQUIRE(ptrs[k] % alignof(float) == 0, "tensor " + std::to_string(t) + ": data pointer is not 4-byte aligned");
      ranges.push_back({ptrs[k], ptrs[k] + static_cast<uintptr_t>(len) * 4, k != 1, t});
    }
    const double bc1 = 1.0 - std::pow(beta1, steps[t]);
    const double bc2 = 1.0 - std::pow(beta2, steps[t]);
    coeffs[t] = {static_cast<float>(1.0 - lr * weight_decay), weight_decay != 0.0, static_cast<float>(1.0 - beta1),
                 static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(std::sqrt(bc2)),
                 static_cast<float>(eps), static_cast<float>(-(lr / bc1)), maximize};
    for (int64_t b = 0; b < len; b += kChunk) work.push_back({t, b, std::min(len, b + kChunk)});
  }
  check_no_overlap(ranges);
  if (work.empty()) return;
  const qk::AdamWRangeFn kernel = qk::adamw_kernel();
  const int64_t nwork = static_cast<int64_t>(work.size());
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, nwork)));
  // Static schedule: each thread walks a contiguous run of chunks (sequential memory).
#pragma omp parallel for schedule(static) num_threads(T)
  for (int64_t w = 0; w < nwork; ++w) {
    const Work& job = work[w];
    const size_t t = job.tensor;
    kernel(reinterpret_cast<float*>(params[t]), reinterpret_cast<const float*>(grads[t]),
           reinterpret_cast<float*>(exp_avgs[t]), reinterpret_cast<float*>(exp_avg_sqs[t]), job.begin, job.end,
           coeffs[t]);
  }
}

}  // namespace

void register_adamw(py::module_& m) {
  m.def("adamw_step", &adamw_step, py::call_guard<py::gil_scoped_release>(), py::arg("params"), py::arg("grads"),
        py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("numels"), py::arg("steps"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("maximize"),
        py::arg("nthreads"),
        "One fused AdamW step (decoupled weight decay, no amsgrad) over a list of contiguous fp32 tensors, "
        "given as data pointers with their element counts and per-tensor step numbers (already incremented). "
        "Updates param, exp_avg and exp_avg_sq in place in one pass, in torch.optim.AdamW's order of operations.");
}
