// Scratch accounting and the per-ISA table of the fused 4-bit linear kernels. Built for
// the baseline ISA: the ISA-flagged files only call into it.
#include <algorithm>
#include <atomic>
#include <new>

#include "dispatch.h"
#include "linear4.h"

namespace qk {
namespace {

std::atomic<int64_t> g_peak{0};

const Linear4Kernels kScalar{linear4_forward_scalar, linear4_backward_input_scalar, linear4_plan_scalar};
#if defined(QK_X86)
const Linear4Kernels kAvx2{linear4_forward_avx2, linear4_backward_input_avx2, linear4_plan_avx2};
const Linear4Kernels kAvx512{linear4_forward_avx512, linear4_backward_input_avx512, linear4_plan_avx512};
#endif

}  // namespace

const Linear4Kernels& linear4_kernels() {
#if defined(QK_X86)
  return for_current_isa(kScalar, kAvx2, kAvx512);
#else
  return for_current_isa(kScalar, kScalar, kScalar);
#endif
}

ScratchMeter::ScratchMeter() : live_(0), peak_(0) {}

ScratchMeter::~ScratchMeter() {
  const int64_t mine = __atomic_load_n(&peak_, __ATOMIC_RELAXED);
  int64_t seen = g_peak.load(std::memory_order_relaxed);
  while (mine > seen && !g_peak.compare_exchange_weak(seen, mine, std::memory_order_relaxed)) {
  }
}

void ScratchMeter::charge(int64_t bytes) {
  const int64_t now = __atomic_add_fetch(&live_, bytes, __ATOMIC_RELAXED);
  int64_t seen = __atomic_load_n(&peak_, __ATOMIC_RELAXED);
  while (now > seen && !__atomic_compare_exchange_n(&peak_, &seen, now, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

void ScratchMeter::release(int64_t bytes) { __atomic_sub_fetch(&live_, bytes, __ATOMIC_RELAXED); }

ScratchBuf::ScratchBuf(ScratchMeter& meter, int64_t nfloats)
    : meter_(meter), p_(nullptr), bytes_(std::max<int64_t>(nfloats, 16) * int64_t(sizeof(float))) {
  p_ = static_cast<float*>(::operator new(static_cast<size_t>(bytes_), std::align_val_t(64)));
  meter_.charge(bytes_);
}

ScratchBuf::~ScratchBuf() {
  ::operator delete(p_, std::align_val_t(64));
  meter_.release(bytes_);
}

int64_t linear4_peak_scratch_bytes() { return g_peak.load(std::memory_order_relaxed); }
void linear4_reset_peak_scratch() { g_peak.store(0, std::memory_order_relaxed); }

}  // namespace qk
