/* qlora-kernels, OpenCL C 1.2: the 4-bit linear layer and its input gradient as FPGA
 * style single work-item kernels, the forward optionally fused with a LoRA adapter:
 *
 *   y = x @ Wd^T (+ bias) + scaling * u @ B^T,   u = (x * noise) @ A^T   (R > 0)
 *
 * The weight is streamed once per QK_TM rows of x, in 16-byte bursts (32 weights, one
 * block) decoded by a register ROM; x (or the dx accumulator) sits on chip in chunks of
 * QK_KCH columns, and the adapter's rank-R projection u is accumulated on chip, so the
 * LoRA branch costs no extra pass over x or y.  A floating-point add cannot retire every
 * cycle into the same register, so every reduction rotates through QK_LANES partial
 * sums: the dependency distance becomes QK_LANES iterations and the loop can hold II=1.
 * On PoCL these run as one thread: they are for proving the FPGA source bit-exact and
 * within tolerance, not for speed.
 */
#ifndef QK_TM
#define QK_TM 4
#endif
#ifndef QK_KCH
#define QK_KCH 2048 /* multiple of 32, so wide beats never cross a chunk */
#endif
#ifndef QK_LANES
#define QK_LANES 8
#endif
#ifndef QK_RMAX
#define QK_RMAX 64 /* largest LoRA rank kept on chip; the host falls back above it */
#endif

inline float qk_weight_rom(const __global uchar* packed, const __global float* absmax, long i, int bs_shift,
                           const float* rom) {
  const uchar b = packed[i >> 1];
  return rom[(i & 1) ? (b & 15) : (b >> 4)] * absmax[i >> bs_shift];
}

__kernel QK_TASK void linear4_fwd_task(const __global float* x, int M, int K, const __global uchar* packed,
                                       const __global float* absmax, int bs_shift, int qt, int N,
                                       const __global float* bias, int has_bias, __global float* y, int R,
                                       const __global float* A, const __global float* B, float scaling,
                                       const __global float* noise, int has_noise, __global float* u) {
  __local float xs[QK_TM * QK_KCH];
  float rom[16] QK_ROM;
  QK_UNROLL
  for (int j = 0; j < 16; j++) rom[j] = QK_CODE[qt][j];
  /* rows of a whole number of beats: every beat is 32 aligned elements of one block */
  const int wide = (K % 32) == 0;
  for (int m0 = 0; m0 < M; m0 += QK_TM) {
    const int tms = min(QK_TM, M - m0);
    float ua[QK_TM][QK_RMAX];
    for (int t = 0; t < QK_TM; t++)
      for (int r = 0; r < QK_RMAX; r++) ua[t][r] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += QK_KCH) {
      const int kc = min(QK_KCH, K - k0);
      QK_PIPELINE
      for (int e = 0; e < QK_TM * kc; e++) {
        const int t = e / kc, k = e % kc;
        xs[t * QK_KCH + k] = (t < tms) ? x[(long)(m0 + t) * K + k0 + k] : 0.0f;
      }
      for (int r = 0; r < R; r++) { /* A streamed row by row, u stays on chip */
        for (int t = 0; t < tms; t++) {
          float part[QK_LANES];
          for (int l = 0; l < QK_LANES; l++) part[l] = 0.0f;
          const long xrow = (long)(m0 + t) * K + k0;
          QK_PIPELINE
          for (int k = 0; k < kc; k++) {
            const float xd = has_noise ? xs[t * QK_KCH + k] * noise[xrow + k] : xs[t * QK_KCH + k];
            part[k % QK_LANES] += xd * A[(long)r * K + k0 + k];
          }
          for (int l = 0; l < QK_LANES; l++) ua[t][r] += part[l];
        }
      }
      for (int n = 0; n < N; n++) {
        float part[QK_TM][QK_LANES];
        for (int t = 0; t < QK_TM; t++)
          for (int l = 0; l < QK_LANES; l++) part[t][l] = 0.0f;
        const long i0 = (long)n * K + k0;
        if (wide) {
          QK_PIPELINE
          for (int b = 0; b < kc / 32; b++) {
            const uchar16 v = vload16(0, packed + (i0 >> 1) + 16 * b);
            const float am = absmax[(i0 + 32 * b) >> bs_shift];
            const float16 w0 = qk_decode16_rom(v.lo, am, rom), w1 = qk_decode16_rom(v.hi, am, rom);
            QK_UNROLL
            for (int t = 0; t < QK_TM; t++)
              part[t][b % QK_LANES] += qk_hsum16(w0 * vload16(0, xs + t * QK_KCH + 32 * b)) +
                                       qk_hsum16(w1 * vload16(0, xs + t * QK_KCH + 32 * b + 16));
          }
        } else {
          QK_PIPELINE
          for (int k = 0; k < kc; k++) {
            const float w = qk_weight_rom(packed, absmax, i0 + k, bs_shift, rom);
            QK_UNROLL
            for (int t = 0; t < QK_TM; t++) part[t][k % QK_LANES] += w * xs[t * QK_KCH + k];
          }
        }
        for (int t = 0; t < tms; t++) {
          float s = 0.0f;
          for (int l = 0; l < QK_LANES; l++) s += part[t][l];
          const long o = (long)(m0 + t) * N + n;
          /* chunks after the first accumulate into y in memory */
          y[o] = (k0 == 0 ? (has_bias ? bias[n] : 0.0f) : y[o]) + s;
        }
      }
    }
    if (R > 0) { /* LoRA epilogue from the on-chip u; u is kept for the backward */
      for (int t = 0; t < tms; t++)
        for (int r = 0; r < R; r++) u[(long)(m0 + t) * R + r] = ua[t][r];
      for (int n = 0; n < N; n++) {
        for (int t = 0; t < tms; t++) {
          float s = 0.0f;
          for (int r = 0; r < R; r++) s += ua[t][r] * B[(long)n * R + r];
          y[(long)(m0 + t) * N + n] += scaling * s;
        }
      }
    }
  }
}

__kernel QK_TASK void linear4_bwd_task(const __global float* dy, int M, int N, const __global uchar* packed,
                                       const __global float* absmax, int bs_shift, int qt, int K,
                                       __global float* dx) {
  __local float acc[QK_TM * QK_KCH]; /* the dx tile lives on chip while W streams past */
  float rom[16] QK_ROM;
  QK_UNROLL
  for (int j = 0; j < 16; j++) rom[j] = QK_CODE[qt][j];
  const int wide = (K % 32) == 0;
  for (int m0 = 0; m0 < M; m0 += QK_TM) {
    const int tms = min(QK_TM, M - m0);
    for (int k0 = 0; k0 < K; k0 += QK_KCH) {
      const int kc = min(QK_KCH, K - k0);
      QK_PIPELINE
      for (int e = 0; e < QK_TM * QK_KCH; e++) acc[e] = 0.0f;
      for (int n = 0; n < N; n++) {
        float d[QK_TM];
        for (int t = 0; t < QK_TM; t++) d[t] = (t < tms) ? dy[(long)(m0 + t) * N + n] : 0.0f;
        const long i0 = (long)n * K + k0;
        if (wide) {
          /* consecutive beats touch different accumulators: no loop-carried dependency */
          QK_PIPELINE
          for (int b = 0; b < kc / 32; b++) {
            const uchar16 v = vload16(0, packed + (i0 >> 1) + 16 * b);
            const float am = absmax[(i0 + 32 * b) >> bs_shift];
            const float16 w0 = qk_decode16_rom(v.lo, am, rom), w1 = qk_decode16_rom(v.hi, am, rom);
            QK_UNROLL
            for (int t = 0; t < QK_TM; t++) {
              __local float* a = acc + t * QK_KCH + 32 * b;
              vstore16(vload16(0, a) + d[t] * w0, 0, a);
              vstore16(vload16(0, a + 16) + d[t] * w1, 0, a + 16);
            }
          }
        } else {
          QK_PIPELINE
          for (int k = 0; k < kc; k++) {
            const float w = qk_weight_rom(packed, absmax, i0 + k, bs_shift, rom);
            QK_UNROLL
            for (int t = 0; t < QK_TM; t++) acc[t * QK_KCH + k] += d[t] * w;
          }
        }
      }
      for (int t = 0; t < tms; t++) {
        QK_PIPELINE
        for (int k = 0; k < kc; k++) dx[(long)(m0 + t) * K + k0 + k] = acc[t * QK_KCH + k];
      }
    }
  }
}
