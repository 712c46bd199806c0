/* qlora-kernels, OpenCL C 1.2: the fused 4-bit linear layer and its input gradient.
 *
 *   forward   y[M, N]  = x[M, K] @ Wd[N, K]^T (+ bias[N])
 *   backward dx[M, K]  = dy[M, N] @ Wd[N, K]
 *
 * Wd is never materialized: tiles of it are decoded into local memory (NDRange) or
 * streamed through a decoder (FPGA style).  Every decoded weight is exactly
 * code[nibble] * absmax (one fp32 rounding, as dequantize_4bit), then products are
 * accumulated in fp32 (fma allowed): |err| <= (K+2) 2^-24 (|x| @ |Wd|^T).
 * K need not be a multiple of anything: a block may straddle two rows and an odd K makes
 * every other row start in a low nibble; those shapes take the per-element paths.
 */

/* ---- NDRange: GEMM tiles (many rows) --------------------------------------------- */

/* A work-group owns a QK_BM x QK_BN tile of the output and walks the reduction in
 * chunks of QK_KC; each work-item keeps QK_RM rows x 16 columns of accumulators in
 * registers (float16: one AVX-512 register on PoCL).  Decoding a weight tile once per
 * work-group amortizes it over QK_BM rows.  The row loops must be unrolled: accumulators
 * live across barriers, and PoCL keeps such arrays in memory unless every index is a
 * constant (then the k loop runs on 8 registers with broadcast-fma from x). */
#ifndef QK_BM
#define QK_BM 128
#endif
#ifndef QK_BN
#define QK_BN 64
#endif
#ifndef QK_RM
#define QK_RM 8
#endif
#ifndef QK_KC
#define QK_KC 128
#endif
#define QK_WG ((QK_BN / 16) * (QK_BM / QK_RM))

/* Byte -> both decoded codes: one local read per pair of weights. */
inline void qk_pair_lut(__local float2* lut, int lid, int qt) {
  for (int b = lid; b < 256; b += QK_WG) lut[b] = (float2)(QK_CODE[qt][b >> 4], QK_CODE[qt][b & 15]);
}

__kernel __attribute__((reqd_work_group_size(QK_BN / 16, QK_BM / QK_RM, 1)))
void linear4_fwd_gemm(const __global float* x, int M, int K, const __global uchar* packed,
                      const __global float* absmax, int bs_shift, int qt, int N, const __global float* bias,
                      int has_bias, __global float* y) {
  __local float wl[QK_KC * QK_BN]; /* wl[k][n]: columns of the tile side by side */
  __local float2 lut[256];
  const int tn = get_local_id(0), tm = get_local_id(1);
  const int lid = tm * (QK_BN / 16) + tn;
  const int n0 = get_group_id(0) * QK_BN, m0 = get_group_id(1) * QK_BM;
  qk_pair_lut(lut, lid, qt);
  const float16 cb = qk_codebook16(qt);
  const int live = m0 + tm * QK_RM < M;
  float16 acc[QK_RM];
  long row[QK_RM]; /* rows past M repeat the last row and are never stored */
  QK_UNROLL
  for (int r = 0; r < QK_RM; r++) {
    acc[r] = (float16)(0.0f);
    row[r] = (long)min(m0 + tm * QK_RM + r, M - 1) * K;
  }
  for (int k0 = 0; k0 < K; k0 += QK_KC) {
    const int kc = min(QK_KC, K - k0);
    barrier(CLK_LOCAL_MEM_FENCE);
    if (K % 16 == 0) { /* rows start on a 16-element boundary: decode 16 at a time */
      for (int e = lid; e < QK_BN * (QK_KC / 16); e += QK_WG) {
        const int r = e / (QK_KC / 16), c = 16 * (e % (QK_KC / 16));
        float16 w = (float16)(0.0f);
        if (n0 + r < N && c < kc) {
          const long i = (long)(n0 + r) * K + k0 + c;
          w = qk_decode16(vload8(0, packed + (i >> 1)), absmax[i >> bs_shift], cb);
        }
        QK_UNROLL
        for (int j = 0; j < 16; j++) wl[(c + j) * QK_BN + r] = ((const float*)&w)[j];
      }
    } else if ((K & 1) == 0) { /* every row starts on a byte: decode by pairs */
      for (int e = lid; e < QK_BN * (QK_KC / 2); e += QK_WG) {
        const int r = e / (QK_KC / 2), c = 2 * (e % (QK_KC / 2));
        float2 w = (float2)(0.0f);
        if (n0 + r < N && c < kc) {
          const long i = (long)(n0 + r) * K + k0 + c;
          w = lut[packed[i >> 1]] * absmax[i >> bs_shift];
        }
        wl[c * QK_BN + r] = w.x;
        wl[(c + 1) * QK_BN + r] = w.y;
      }
    } else {
      for (int e = lid; e < QK_BN * QK_KC; e += QK_WG) {
        const int r = e / QK_KC, c = e % QK_KC;
        wl[c * QK_BN + r] = (n0 + r < N && c < kc)
                                ? qk_weight(packed, absmax, (long)(n0 + r) * K + k0 + c, bs_shift, QK_CODE[qt])
                                : 0.0f;
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (live) { /* work-items past the last row only help decode */
      const __global float* xr[QK_RM]; /* one base register per row, k as the index */
      QK_UNROLL
      for (int r = 0; r < QK_RM; r++) xr[r] = x + row[r] + k0;
      for (int k = 0; k < kc; k++) {
        const float16 w = vload16(0, wl + k * QK_BN + tn * 16);
        QK_UNROLL
        for (int r = 0; r < QK_RM; r++) acc[r] = fma((float16)(xr[r][k]), w, acc[r]);
      }
    }
  }
  const int n = n0 + tn * 16;
  float16 b = (float16)(0.0f);
  if (has_bias)
    for (int j = 0; j < 16; j++) ((float*)&b)[j] = (n + j < N) ? bias[n + j] : 0.0f;
  for (int r = 0; r < QK_RM; r++) {
    const int m = m0 + tm * QK_RM + r;
    if (m >= M) break;
    const float16 v = acc[r] + b;
    if (n + 16 <= N) {
      vstore16(v, 0, y + (long)m * N + n);
    } else {
      for (int j = 0; j < 16 && n + j < N; j++) y[(long)m * N + n + j] = ((const float*)&v)[j];
    }
  }
}

/* Input gradient, the same tiling with the roles of N and K exchanged: the tile is
 * decoded in storage order (wl[n][k]), the reduction runs over n. */
__kernel __attribute__((reqd_work_group_size(QK_BN / 16, QK_BM / QK_RM, 1)))
void linear4_bwd_gemm(const __global float* dy, int M, int N, const __global uchar* packed,
                      const __global float* absmax, int bs_shift, int qt, int K, __global float* dx) {
  __local float wl[QK_KC * QK_BN];
  __local float2 lut[256];
  const int tk = get_local_id(0), tm = get_local_id(1);
  const int lid = tm * (QK_BN / 16) + tk;
  const int k0 = get_group_id(0) * QK_BN, m0 = get_group_id(1) * QK_BM;
  qk_pair_lut(lut, lid, qt);
  const float16 cb = qk_codebook16(qt);
  const int live = m0 + tm * QK_RM < M;
  float16 acc[QK_RM];
  long row[QK_RM];
  QK_UNROLL
  for (int r = 0; r < QK_RM; r++) {
    acc[r] = (float16)(0.0f);
    row[r] = (long)min(m0 + tm * QK_RM + r, M - 1) * N;
  }
  for (int n0 = 0; n0 < N; n0 += QK_KC) {
    const int nc = min(QK_KC, N - n0);
    barrier(CLK_LOCAL_MEM_FENCE);
    if (K % 16 == 0) {
      for (int e = lid; e < QK_KC * (QK_BN / 16); e += QK_WG) {
        const int c = e / (QK_BN / 16), r = 16 * (e % (QK_BN / 16));
        float16 w = (float16)(0.0f);
        if (c < nc && k0 + r < K) {
          const long i = (long)(n0 + c) * K + k0 + r;
          w = qk_decode16(vload8(0, packed + (i >> 1)), absmax[i >> bs_shift], cb);
        }
        vstore16(w, 0, wl + c * QK_BN + r);
      }
    } else if ((K & 1) == 0) {
      for (int e = lid; e < QK_KC * (QK_BN / 2); e += QK_WG) {
        const int c = e / (QK_BN / 2), r = 2 * (e % (QK_BN / 2));
        float2 w = (float2)(0.0f);
        if (c < nc && k0 + r < K) {
          const long i = (long)(n0 + c) * K + k0 + r;
          w = lut[packed[i >> 1]] * absmax[i >> bs_shift];
        }
        vstore2(w, 0, wl + c * QK_BN + r);
      }
    } else {
      for (int e = lid; e < QK_KC * QK_BN; e += QK_WG) {
        const int c = e / QK_BN, r = e % QK_BN;
        wl[c * QK_BN + r] = (c < nc && k0 + r < K)
                                ? qk_weight(packed, absmax, (long)(n0 + c) * K + k0 + r, bs_shift, QK_CODE[qt])
                                : 0.0f;
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (live) {
      const __global float* dr[QK_RM];
      QK_UNROLL
      for (int r = 0; r < QK_RM; r++) dr[r] = dy + row[r] + n0;
      for (int c = 0; c < nc; c++) {
        const float16 w = vload16(0, wl + c * QK_BN + tk * 16);
        QK_UNROLL
        for (int r = 0; r < QK_RM; r++) acc[r] = fma((float16)(dr[r][c]), w, acc[r]);
      }
    }
  }
  const int k = k0 + tk * 16;
  for (int r = 0; r < QK_RM; r++) {
    const int m = m0 + tm * QK_RM + r;
    if (m >= M) break;
    if (k + 16 <= K) {
      vstore16(acc[r], 0, dx + (long)m * K + k);
    } else {
      for (int j = 0; j < 16 && k + j < K; j++) dx[(long)m * K + k + j] = ((const float*)&acc[r])[j];
    }
  }
}

/* ---- NDRange: GEMV (a few rows) -------------------------------------------------- */

/* Few rows: the weight stream is the cost, so each work-item decodes one output's row
 * once and applies it to all MM rows of x.  MM is a literal at each call site, so the
 * row loops unroll and no accumulator is wasted. */
#ifndef QK_GEMV_KC
#define QK_GEMV_KC 1024 /* columns of x per pass: 8 rows of it stay in a 32 KB L1 */
#endif

static inline __attribute__((always_inline)) void qk_fwd_gemv(
    const int MM, const __global float* x, int M, int K, const __global uchar* packed, const __global float* absmax,
    int bs_shift, int qt, int N, const __global float* bias, int has_bias, __global float* y, int xsplit) {
  const int n = get_global_id(0);
  const int live = n < N; /* no early return: every work-item must reach the barriers */
  const float16 cb = qk_codebook16(qt);
  long row[8];
  QK_UNROLL
  for (int m = 0; m < MM; m++) row[m] = (long)min(m, M - 1) * K;
  float s[8];
  const long i0 = (long)min(n, N - 1) * K;
  if (K % 16 == 0) { /* rows start on a 16-element boundary: chunks never straddle a block */
    float16 acc[8], odd[8];
    QK_UNROLL
    for (int m = 0; m < MM; m++) acc[m] = odd[m] = (float16)(0.0f);
    /* The barrier makes PoCL run the whole work-group over one slice of x before the
     * next, so x is read from L1 rather than once per output from L2. */
    for (int kc = 0; kc < K; kc += QK_GEMV_KC) {
      barrier(CLK_LOCAL_MEM_FENCE);
      const int kend = min(K, kc + QK_GEMV_KC);
      if (live) {
        int k = kc;
        if (xsplit == 2) { /* K % 128 == 0, x in dword order: see qk_dword_order */
          for (; k < kend; k += 128) {
            const long i = i0 + k;
            const uint16 u = vload16(0, (const __global uint*)(packed + (i >> 1)));
            /* the scale of each 4-byte lane's block (lane j: elements 8j..8j+7; blocks >= 32) */
            const float16 sc = (float16)((float4)(absmax[i >> bs_shift]), (float4)(absmax[(i + 32) >> bs_shift]),
                                         (float4)(absmax[(i + 64) >> bs_shift]), (float4)(absmax[(i + 96) >> bs_shift]));
            QK_UNROLL
            for (int S = 0; S < 8; S += 2) {
              const float16 w0 = qk_pick16(cb, (u >> (uint16)(4 * S)) & (uint16)(15)) * sc;
              const float16 w1 = qk_pick16(cb, (u >> (uint16)(4 * S + 4)) & (uint16)(15)) * sc;
              QK_UNROLL
              for (int m = 0; m < MM; m++) {
                acc[m] = fma(vload16(0, x + row[m] + k + 16 * S), w0, acc[m]);
                odd[m] = fma(vload16(0, x + row[m] + k + 16 * S + 16), w1, odd[m]);
              }
            }
          }
        }
        if (xsplit == 1) { /* x arrives as (evens, odds) per 32 columns; K % 32 == 0 */
          for (; k < kend; k += 32) {
            float16 we, wo;
            qk_decode32_split(vload16(0, packed + ((i0 + k) >> 1)), cb * absmax[(i0 + k) >> bs_shift], &we, &wo);
            QK_UNROLL
            for (int m = 0; m < MM; m++) { /* two chains: one fma latency per step, not two */
              acc[m] = fma(vload16(0, x + row[m] + k), we, acc[m]);
              odd[m] = fma(vload16(0, x + row[m] + k + 16), wo, odd[m]);
            }
          }
        }
        for (; k < kend; k += 16) {
          const float16 w = qk_decode16(vload8(0, packed + ((i0 + k) >> 1)), absmax[(i0 + k) >> bs_shift], cb);
          QK_UNROLL
          for (int m = 0; m < MM; m++) acc[m] = fma(vload16(0, x + row[m] + k), w, acc[m]);
        }
      }
    }
    QK_UNROLL
    for (int m = 0; m < MM; m++) s[m] = qk_hsum16(acc[m] + odd[m]);
  } else {
    for (int m = 0; m < MM; m++) s[m] = 0.0f;
    for (int k = 0; k < K; k++) {
      const float w = qk_weight(packed, absmax, i0 + k, bs_shift, QK_CODE[qt]);
      for (int m = 0; m < MM; m++) s[m] = fma(x[row[m] + k], w, s[m]);
    }
  }
  if (!live) return;
  const float b = has_bias ? bias[n] : 0.0f;
  for (int m = 0; m < MM && m < M; m++) y[(long)m * N + n] = s[m] + b;
}

/* Dword order (xsplit == 2, little-endian devices): 128 weights are read as 16 dwords, and
 * step S of 8 takes nibble S of every dword (shift, then the 16-entry permute) -- 16
 * weights for two instructions, no interleaving.  Lane j of step S is element 8j + e(S),
 * e = 1, 0, 3, 2, 5, 4, 7, 6 (the low nibble of a byte is its odd element), so the host
 * hands x over permuted the same way. */

/* One work-item per 32 columns of dx (K % 32 == 0; 16 otherwise), walking all N rows of
 * the weight; the 32-column path accumulates even and odd columns apart and interleaves
 * them once at the end. */
static inline __attribute__((always_inline)) void qk_bwd_gemv(
    const int MM, const __global float* dy, int M, int N, const __global uchar* packed, const __global float* absmax,
    int bs_shift, int qt, int K, __global float* dx) {
  const int wide = K % 32 == 0;
  const int k0 = get_global_id(0) * (wide ? 32 : 16);
  if (k0 >= K) return;
  const float16 cb = qk_codebook16(qt);
  long row[8];
  QK_UNROLL
  for (int m = 0; m < MM; m++) row[m] = (long)min(m, M - 1) * N;
  float16 acc[8], odd[8];
  QK_UNROLL
  for (int m = 0; m < MM; m++) acc[m] = odd[m] = (float16)(0.0f);
  if (wide) {
    for (int n = 0; n < N; n++) {
      const long i = (long)n * K + k0;
      float16 we, wo;
      qk_decode32_split(vload16(0, packed + (i >> 1)), cb * absmax[i >> bs_shift], &we, &wo);
      QK_UNROLL
      for (int m = 0; m < MM; m++) {
        const float16 d = (float16)(dy[row[m] + n]);
        acc[m] = fma(d, we, acc[m]);
        odd[m] = fma(d, wo, odd[m]);
      }
    }
    for (int m = 0; m < MM && m < M; m++) {
      __global float* o = dx + (long)m * K + k0;
      for (int j = 0; j < 16; j++) {
        o[2 * j] = ((const float*)&acc[m])[j];
        o[2 * j + 1] = ((const float*)&odd[m])[j];
      }
    }
    return;
  }
  if (K % 16 == 0) {
    for (int n = 0; n < N; n++) {
      const long i = (long)n * K + k0;
      const float16 w = qk_decode16(vload8(0, packed + (i >> 1)), absmax[i >> bs_shift], cb);
      QK_UNROLL
      for (int m = 0; m < MM; m++) acc[m] = fma((float16)(dy[row[m] + n]), w, acc[m]);
    }
  } else {
    for (int n = 0; n < N; n++) {
      float w[16];
      for (int j = 0; j < 16; j++)
        w[j] = (k0 + j < K) ? qk_weight(packed, absmax, (long)n * K + k0 + j, bs_shift, QK_CODE[qt]) : 0.0f;
      QK_UNROLL
      for (int m = 0; m < MM; m++) acc[m] = fma((float16)(dy[row[m] + n]), vload16(0, w), acc[m]);
    }
  }
  for (int m = 0; m < MM && m < M; m++) {
    if (k0 + 16 <= K) {
      vstore16(acc[m], 0, dx + (long)m * K + k0);
    } else {
      for (int j = 0; j < 16 && k0 + j < K; j++) dx[(long)m * K + k0 + j] = ((const float*)&acc[m])[j];
    }
  }
}

#define QK_GEMV_KERNELS(MM)                                                                                   \
  __kernel void linear4_fwd_gemv##MM(const __global float* x, int M, int K, const __global uchar* packed,   \
                                     const __global float* absmax, int bs_shift, int qt, int N,             \
                                     const __global float* bias, int has_bias, __global float* y,           \
                                     int xsplit) {                                                          \
    qk_fwd_gemv(MM, x, M, K, packed, absmax, bs_shift, qt, N, bias, has_bias, y, xsplit);                   \
  }                                                                                                         \
  __kernel void linear4_bwd_gemv##MM(const __global float* dy, int M, int N, const __global uchar* packed,  \
                                     const __global float* absmax, int bs_shift, int qt, int K,             \
                                     __global float* dx) {                                                  \
    qk_bwd_gemv(MM, dy, M, N, packed, absmax, bs_shift, qt, K, dx);                                         \
  }
QK_GEMV_KERNELS(1)
QK_GEMV_KERNELS(2)
QK_GEMV_KERNELS(4)
QK_GEMV_KERNELS(8)
