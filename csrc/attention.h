// qlora-kernels: causal self-attention of a decoder's training step, forward and backward,
// torch-free (the CPU side of ops/attention.py).
//
//   s[i, j] = scale * q_i . k_j,  p = softmax over j <= i,  o_i = sum_j p[i, j] v_j
//   lse_i = log sum_{j <= i} exp(s[i, j])                       (kept for the backward)
//   backward (p recomputed from lse): dv_j += sum_i p[i, j] do_i,  dp[i, j] = do_i . v_j,
//   ds = p * (dp - do_i . o_i),  dq_i = scale * sum_j ds[i, j] k_j,  dk_j += scale * sum_i ds[i, j] q_i
//
// Grouped-query attention: query head h reads key/value head h / (H / Hk). Query rows go a
// block at a time; a block's scores against every key up to its last row fit in a scratch
// row block, so the softmax takes its true row maximum (no running rescale, as flash
// attention needs when keys stream). Each ISA path fills one table with the three block
// products and the two softmax row passes (attention_simd.h); attention_bindings.cpp splits
// the work over threads: the forward by (batch, head, query block), the backward by (batch,
// key/value head), so every output element is summed by one thread in a fixed order and the
// result does not depend on the thread count.
#pragma once
#include <cstdint>

namespace qk {

constexpr int64_t kAttnPad = 16;  // the widest vector's lanes

// How rows_by_rows writes its rows: scaled by alpha and a per-row factor (null: 1), added
// to C or stored.
struct Mix {
  float alpha = 1.0f;
  const float* row_scale = nullptr;
  bool accumulate = false;
  float factor(int64_t i) const { return row_scale ? alpha * row_scale[i] : alpha; }
};

struct AttnKernels {
  // causal0 >= 0 is the global index of block row 0 (keys indexed from 0): row i sees keys
  // j <= causal0 + i. The products then skip what no row of a tile sees; what they read of
  // P past a row's causal end (up to its 4-row tile's) must be zeros, which the softmax
  // pass writes there.
  //
  // C[i*ldc + j] = alpha * sum_d X[i*ldx + d] * Yt[d*ldy + j] for i < nr, j < nc (causal:
  // entries past a row's end may be left unwritten). Yt's rows are read up to the next
  // multiple of kAttnPad columns past nc: the caller pads them.
  void (*rows_by_cols)(const float* X, int64_t ldx, const float* Yt, int64_t ldy, int64_t nr, int64_t nc, int64_t D,
                       float alpha, float* C, int64_t ldc, int64_t causal0);
  // C[i*ldc + e] = (C[i*ldc + e] if m.accumulate) + m.factor(i) * sum_j P[i*ldp + j] * Y[j*ldy + e]
  // for i < nr, e < D.
  void (*rows_by_rows)(const float* P, int64_t ldp, const float* Y, int64_t ldy, int64_t nr, int64_t nc, int64_t D,
                       const Mix& m, float* C, int64_t ldc, int64_t causal0);
  // C[j*ldc + e] += sum_i P[i*ldp + j] * Y[i*ldy + e] for j < nc, e < D, i < nr.
  void (*cols_by_rows_acc)(const float* P, int64_t ldp, const float* Y, int64_t ldy, int64_t nr, int64_t nc,
                           int64_t D, float* C, int64_t ldc, int64_t causal0);
  float (*row_max)(const float* s, int64_t n);
  // s[j] = exp(s[j] - shift) for j < n; returns their sum (fixed order)
  float (*exp_shift_sum)(float* s, int64_t n, float shift);
  // ds[j] = p[j] * (ds[j] - delta) * scale for j < n (ds holds dp on entry)
  void (*softmax_grad)(const float* p, float* ds, int64_t n, float delta, float scale);
  float (*dot)(const float* a, const float* b, int64_t n);
};

AttnKernels attention_scalar();
#if defined(QK_X86)
AttnKernels attention_avx2();
AttnKernels attention_avx512();
#endif

const AttnKernels& attention_kernels();  // the current ISA path (dispatch.h)

}  // namespace qk
