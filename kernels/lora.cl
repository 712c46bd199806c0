/* qlora-kernels, OpenCL C 1.2: the LoRA adapter's products around a base linear layer,
 * NDRange style.  With xd = x * noise (noise: the scaled dropout mask, or none),
 * u = xd @ A^T, and Bt = B^T (the host passes B transposed, [R, N], so that every
 * product below reads its long axis contiguously):
 *
 *   forward   u        = lora_rowdot(xd, A)                    [M, R]
 *             y       += scaling * lora_rowmix(u, Bt)          [M, N]
 *   backward  du       = scaling * lora_rowdot(dy, Bt)         [M, R]
 *             dB       = scaling * lora_colmix(dy, u)^T        [N, R]
 *             dA       = lora_colmix(xd, du)                   [R, K]
 *             dx_lora  = lora_rowmix(du, A) * noise            [M, K]
 *
 * Three shapes of skinny product cover all six: rowdot (long dot products, one output
 * per work-item), rowmix (a rank-R mix of long rows, 16 outputs x QK_MB rows per
 * work-item) and colmix (a reduction over the M rows, 16 outputs x QK_RB ranks per
 * work-item).  All fp32, fma allowed; results differ from the reference by summation
 * order only.  The FPGA-style fused forward is linear4_fwd_task (linear4_task.cl).
 */
#ifndef QK_MB
#define QK_MB 4
#endif
#ifndef QK_RB
#define QK_RB 8
#endif

/* 16 floats from p, zero past `valid` (the ragged end of a row). */
inline float16 qk_load16p(const __global float* p, int valid) {
  if (valid >= 16) return vload16(0, p);
  float t[16];
  for (int j = 0; j < 16; j++) t[j] = (j < valid) ? p[j] : 0.0f;
  return vload16(0, t);
}

inline void qk_store16p(float16 v, __global float* p, int valid) {
  if (valid >= 16) {
    vstore16(v, 0, p);
  } else {
    for (int j = 0; j < valid; j++) p[j] = ((const float*)&v)[j];
  }
}

/* out[m, r] = scale * sum_l (a * noise)[m, l] * b[r, l];  a [M, L], b [R, L]. */
__kernel void lora_rowdot(const __global float* a, const __global float* noise, int has_noise, int M, int L,
                          const __global float* b, int R, float scale, __global float* out) {
  const int r = get_global_id(0), m = get_global_id(1);
  if (r >= R || m >= M) return;
  const __global float* ar = a + (long)m * L;
  const __global float* nr = noise + (long)m * L;
  const __global float* br = b + (long)r * L;
  float16 acc = (float16)(0.0f);
  int l = 0;
  for (; l + 16 <= L; l += 16) {
    float16 av = vload16(0, ar + l);
    if (has_noise) av *= vload16(0, nr + l);
    acc = fma(av, vload16(0, br + l), acc);
  }
  float s = qk_hsum16(acc);
  for (; l < L; l++) s = fma(has_noise ? ar[l] * nr[l] : ar[l], br[l], s);
  out[(long)m * R + r] = scale * s;
}

/* out[m, l] = ((accumulate ? out[m, l] : 0) + scale * sum_r c[m, r] * b[r, l]) * noise[m, l];
 * c [M, R], b [R, L]. */
__kernel void lora_rowmix(const __global float* c, const __global float* b, int M, int L, int R, float scale,
                          int accumulate, const __global float* noise, int has_noise, __global float* out) {
  const int l0 = get_global_id(0) * 16, m0 = get_global_id(1) * QK_MB;
  if (l0 >= L || m0 >= M) return;
  const int valid = min(16, L - l0);
  float16 acc[QK_MB];
  QK_UNROLL
  for (int i = 0; i < QK_MB; i++) acc[i] = (float16)(0.0f);
  const __global float* cr[QK_MB]; /* rows past M repeat the last one and are not stored */
  QK_UNROLL
  for (int i = 0; i < QK_MB; i++) cr[i] = c + (long)min(m0 + i, M - 1) * R;
  for (int r = 0; r < R; r++) {
    const float16 bv = qk_load16p(b + (long)r * L + l0, valid);
    QK_UNROLL
    for (int i = 0; i < QK_MB; i++) acc[i] = fma((float16)(cr[i][r]), bv, acc[i]);
  }
  for (int i = 0; i < QK_MB && m0 + i < M; i++) {
    __global float* o = out + (long)(m0 + i) * L + l0;
    float16 v = scale * acc[i];
    if (accumulate) v += qk_load16p(o, valid);
    if (has_noise) v *= qk_load16p(noise + (long)(m0 + i) * L + l0, valid);
    qk_store16p(v, o, valid);
  }
}

/* out[r, l] (or out[l, r] when transposed) = scale * sum_m c[m, r] * (a * noise)[m, l];
 * a [M, L], c [M, R]. */
__kernel void lora_colmix(const __global float* a, const __global float* noise, int has_noise, int M, int L,
                          const __global float* c, int R, float scale, int transposed, __global float* out) {
  const int l0 = get_global_id(0) * 16, r0 = get_global_id(1) * QK_RB;
  if (l0 >= L || r0 >= R) return;
  const int valid = min(16, L - l0);
  float16 acc[QK_RB];
  QK_UNROLL
  for (int j = 0; j < QK_RB; j++) acc[j] = (float16)(0.0f);
  int rc[QK_RB]; /* ranks past R repeat the last one and are not stored */
  QK_UNROLL
  for (int j = 0; j < QK_RB; j++) rc[j] = min(r0 + j, R - 1);
  for (int m = 0; m < M; m++) {
    float16 av = qk_load16p(a + (long)m * L + l0, valid);
    if (has_noise) av *= qk_load16p(noise + (long)m * L + l0, valid);
    const __global float* cm = c + (long)m * R;
    QK_UNROLL
    for (int j = 0; j < QK_RB; j++) acc[j] = fma((float16)(cm[rc[j]]), av, acc[j]);
  }
  for (int j = 0; j < QK_RB && r0 + j < R; j++) {
    const float16 v = scale * acc[j];
    if (transposed) {
      for (int i = 0; i < valid; i++) out[(long)(l0 + i) * R + r0 + j] = ((const float*)&v)[i];
    } else {
      qk_store16p(v, out + (long)(r0 + j) * L + l0, valid);
    }
  }
}

/* DoRA's weight norm, from the 4-bit weight without materializing it (PEFT's
 * _get_weight_norm; detached, DoRA paper section 4.3):
 *   norm[n] = || Wd[n, :] + scaling * B[n, :] @ A ||_2,   A [R, K], B [N, R]. */
__kernel void dora_norm(const __global uchar* packed, const __global float* absmax, int bs_shift, int qt, int N,
                        int K, const __global float* A, const __global float* B, int R, float scaling,
                        __global float* norm) {
  const int n = get_global_id(0);
  if (n >= N) return;
  const long i0 = (long)n * K;
  const __global float* bn = B + (long)n * R;
  float s = 0.0f;
  if (K % 16 == 0) {
    const float16 cb = qk_codebook16(qt);
    float16 acc = (float16)(0.0f);
    for (int k = 0; k < K; k += 16) {
      float16 ba = (float16)(0.0f);
      for (int r = 0; r < R; r++) ba = fma((float16)(bn[r]), vload16(0, A + (long)r * K + k), ba);
      const float16 w =
          qk_decode16(vload8(0, packed + ((i0 + k) >> 1)), absmax[(i0 + k) >> bs_shift], cb) + scaling * ba;
      acc = fma(w, w, acc);
    }
    s = qk_hsum16(acc);
  } else {
    for (int k = 0; k < K; k++) {
      float ba = 0.0f;
      for (int r = 0; r < R; r++) ba = fma(bn[r], A[(long)r * K + k], ba);
      const float w = qk_weight(packed, absmax, i0 + k, bs_shift, QK_CODE[qt]) + scaling * ba;
      s = fma(w, w, s);
    }
  }
  norm[n] = sqrt(s);
}
