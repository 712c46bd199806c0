/* qlora-kernels, OpenCL C 1.2: NF4/FP4 blockwise quantization and dequantization, and
 * the 8-bit blockwise decoder of double quantization.  Bytes and bits equal the
 * reference backend's (backends/reference.py), which equal bitsandbytes'.
 *
 * Two styles: *_nd kernels spread blocks/chunks over work-items (PoCL, GPUs); *_task
 * kernels are single work-item loops for FPGA compilers (codebook in a ROM, loops that
 * pipeline at II=1, 16-byte bursts of packed data).
 */
/* PoCL contracts a*b+c into an fma unless told not to; a fused rounding would change
 * quantized bytes, so nothing in this file may contract. */
#pragma OPENCL FP_CONTRACT OFF

/* Bucket of a scaled value: the number of bounds strictly below it (torch.bucketize,
 * ties to the lower bucket), then the nibble that bucket stands for. */
inline uchar qk_encode(float s, int qt) {
  int b = 0;
  QK_UNROLL
  for (int j = 0; j < 15; j++) b += (QK_BOUNDS[qt][j] < s) ? 1 : 0;
  return QK_ORDER[qt][b];
}

inline int qk_finite(float v) { return (as_uint(v) & 0x7F800000u) != 0x7F800000u; }

/* Full blocks multiply by the reciprocal, the tail block divides: that is the order of
 * operations bitsandbytes uses, and it decides the last bit of the scaled value. */
inline float qk_scale(float v, float inv, float floored, int tail) {
  const float s = tail ? v / floored : v * inv;
  return fmin(fmax(s, -1.0f), 1.0f);
}

/* One work-item per block.  bad receives the lowest block holding a NaN or Inf. */
__kernel void quantize4_nd(const __global uchar* src, int dtype, long n, int bs, int qt,
                           __global uchar* packed, __global float* absmax, volatile __global int* bad) {
  const long blk = get_global_id(0);
  const long start = blk * bs;
  if (start >= n) return;
  const int len = (int)min((long)bs, n - start);
  float amax = 0.0f;
  int finite = 1;
  for (int j = 0; j < len; j++) {
    const float v = qk_load(src, dtype, start + j);
    finite &= qk_finite(v);
    amax = fmax(amax, fabs(v));
  }
  if (!finite) {
    atomic_min(bad, (int)blk);
    return;
  }
  const int tail = len < bs;
  const float floored = fmax(amax, QK_ABSMAX_FLOOR);
  const float inv = 1.0f / floored;
  for (int j = 0; j < len; j += 2) {
    const uchar hi = qk_encode(qk_scale(qk_load(src, dtype, start + j), inv, floored, tail), qt);
    /* an odd element count pads the last low nibble with the code of 0.0 */
    const float second = (j + 1 < len) ? qk_scale(qk_load(src, dtype, start + j + 1), inv, floored, tail) : 0.0f;
    packed[(start + j) >> 1] = (uchar)((hi << 4) | qk_encode(second, qt));
  }
  absmax[blk] = tail ? floored : amax;
}

/* One work-item per 16 elements (8 packed bytes, inside one block). */
__kernel void dequantize4_nd(const __global uchar* packed, const __global float* absmax, long n, int bs_shift,
                             int qt, int dtype, __global uchar* out) {
  const long c = get_global_id(0);
  const long i0 = c * 16;
  if (i0 >= n) return;
  const float am = absmax[i0 >> bs_shift];
  if (i0 + 16 <= n) {
    qk_store16(out, dtype, c, qk_decode16(vload8(c, packed), am, qk_codebook16(qt)));
  } else {
    for (long i = i0; i < n; i++) {
      const uchar b = packed[i >> 1];
      qk_store(out, dtype, i, QK_CODE[qt][(i & 1) ? (b & 15) : (b >> 4)] * am);
    }
  }
}

/* 8-bit blockwise decoding (the nested absmax of double quantization): any blocksize. */
__kernel void dequantize8_nd(const __global uchar* q, const __global float* absmax, const __global float* code,
                             long n, long bs, __global float* out) {
  const long i = get_global_id(0);
  if (i < n) out[i] = code[q[i]] * absmax[i / bs];
}

/* ---- FPGA style ------------------------------------------------------------------ */

#ifndef QK_MAX_BLOCK
#define QK_MAX_BLOCK 4096 /* largest blocksize in formats.BLOCKSIZES: one block on chip */
#endif

/* Single work-item: each block is read once into an on-chip buffer while its absmax is
 * reduced, then encoded two elements (one byte) per iteration. */
__kernel QK_TASK void quantize4_task(const __global uchar* src, int dtype, long n, int bs, int qt,
                                     __global uchar* packed, __global float* absmax, __global int* bad) {
  __local float buf[QK_MAX_BLOCK];
  const long nb = (n + bs - 1) / bs;
  for (long blk = 0; blk < nb; blk++) {
    const long start = blk * bs;
    const int len = (int)min((long)bs, n - start);
    float amax = 0.0f;
    int finite = 1;
    QK_PIPELINE
    for (int j = 0; j < len; j++) {
      const float v = qk_load(src, dtype, start + j);
      buf[j] = v;
      finite &= qk_finite(v);
      amax = fmax(amax, fabs(v));
    }
    if (!finite) {
      bad[0] = (int)blk; /* blocks go in order: the first one found is the lowest */
      return;
    }
    const int tail = len < bs;
    const float floored = fmax(amax, QK_ABSMAX_FLOOR);
    const float inv = 1.0f / floored;
    QK_PIPELINE
    for (int j = 0; j < len; j += 2) {
      const uchar hi = qk_encode(qk_scale(buf[j], inv, floored, tail), qt);
      const float second = (j + 1 < len) ? qk_scale(buf[j + 1], inv, floored, tail) : 0.0f;
      packed[(start + j) >> 1] = (uchar)((hi << 4) | qk_encode(second, qt));
    }
    absmax[blk] = tail ? floored : amax;
  }
}

/* Single work-item: 16-byte bursts (32 elements, one block) decoded by 32 parallel ROM
 * reads per iteration; the codebook ROM is a register file, not a memory port. */
__kernel QK_TASK void dequantize4_task(const __global uchar* packed, const __global float* absmax, long n,
                                       int bs_shift, int qt, int dtype, __global uchar* out) {
  float rom[16] QK_ROM;
  QK_UNROLL
  for (int j = 0; j < 16; j++) rom[j] = QK_CODE[qt][j];
  const long beats = n / 32;
  QK_PIPELINE
  for (long t = 0; t < beats; t++) {
    const uchar16 b = vload16(t, packed);
    const float am = absmax[(t * 32) >> bs_shift];
    qk_store16(out, dtype, 2 * t, qk_decode16_rom(b.lo, am, rom));
    qk_store16(out, dtype, 2 * t + 1, qk_decode16_rom(b.hi, am, rom));
  }
  QK_PIPELINE
  for (long i = beats * 32; i < n; i++) {
    const uchar b = packed[i >> 1];
    qk_store(out, dtype, i, rom[(i & 1) ? (b & 15) : (b >> 4)] * absmax[i >> bs_shift]);
  }
}
