/* qlora-kernels, OpenCL C 1.2: the fused multi-tensor AdamW step (csrc/adamw.h states the
 * update and its order of operations; qlora_kernels/optim/reference.py is the oracle).  The host concatenates the tensors of a parameter group into one flat array per
 * role (param, grad, exp_avg, exp_avg_sq); offsets[t] .. offsets[t+1] is tensor t, and
 * coeffs[8t ..] its fp32 coefficients:
 *   decay (1 - lr*wd), apply_decay (0/1), lerp_w (1 - beta1), beta2, c2 (1 - beta2),
 *   bc2_sqrt (sqrt(1 - beta2^step)), eps, neg_step (-lr / (1 - beta1^step)).
 * Each element is read once and written once.
 */
#pragma OPENCL FP_CONTRACT OFF

#define QK_ADAMW_NCOEF 8

inline void qk_adamw_element(__global float* p, __global const float* g, __global float* m, __global float* v,
                             long i, __global const float* c, int maximize) {
  float gi = maximize ? -g[i] : g[i];
  float pi = p[i];
  if (c[1] != 0.0f) pi = pi * c[0];
  float mi = m[i];
  const float w = c[2];
  /* torch's lerp: the form that stays exact at the end nearer to the weight */
  mi = fabs(w) < 0.5f ? mi + w * (gi - mi) : gi - (gi - mi) * (1.0f - w);
  float vi = v[i] * c[3] + c[4] * gi * gi;
  const float denom = sqrt(vi) / c[5] + c[6];
  p[i] = pi + c[7] * mi / denom;
  m[i] = mi;
  v[i] = vi;
}

/* One work-item per element; the tensor of an element by binary search over offsets. */
__kernel void adamw_nd(__global float* p, __global const float* g, __global float* m, __global float* v,
                       __global const long* offsets, __global const float* coeffs, int ntensors, int maximize) {
  const long i = get_global_id(0);
  if (i >= offsets[ntensors]) return;
  int lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= i) lo = mid; else hi = mid - 1;
  }
  qk_adamw_element(p, g, m, v, i, coeffs + QK_ADAMW_NCOEF * lo, maximize);
}

/* FPGA style: one work-item streams every tensor; the inner loop pipelines at II=1
 * (no loop-carried dependence: each element is independent). */
QK_TASK __kernel void adamw_task(__global float* p, __global const float* g, __global float* m, __global float* v,
                                 __global const long* offsets, __global const float* coeffs, int ntensors,
                                 int maximize) {
  for (int t = 0; t < ntensors; t++) {
    __global const float* c = coeffs + QK_ADAMW_NCOEF * t;
    const long end = offsets[t + 1];
    QK_PIPELINE
    for (long i = offsets[t]; i < end; i++) qk_adamw_element(p, g, m, v, i, c, maximize);
  }
}
