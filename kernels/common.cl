/* qlora-kernels, OpenCL C 1.2: definitions shared by every kernel family.
 *
 * The host builds each program as  <generated tables> + common.cl + <family>.cl.  The
 * generated prefix (qlora_kernels/opencl.py, from qlora_kernels.formats) defines
 *   QK_CODE[q][16]    fp32 code values by nibble, q = index in formats.QUANT_TYPES
 *   QK_BOUNDS[q][15]  ascending midpoints of the sorted codebook
 *   QK_ORDER[q][16]   sorted bucket -> nibble
 *   QK_ABSMAX_FLOOR   bitsandbytes' absmax clamp (a subnormal: no -cl-denorms-are-zero)
 * so no number of the format is ever typed in a .cl file.
 *
 * Packed layout: element i of the flattened row-major weight lives in byte i/2, EVEN i
 * in the HIGH nibble, scaled by absmax[i / blocksize]; blocksizes are powers of two
 * (>= 32), so the host passes log2(blocksize) and a 16- or 32-element chunk starting at
 * a multiple of its length never straddles two blocks.
 *
 * Vendor hints.  Build with -DQK_XILINX (Vitis/v++) or -DQK_INTEL (Intel FPGA SDK; its
 * INTELFPGA_CL define is honoured too) to turn the FPGA-style kernels' hints on; PoCL and
 * GPUs see none of them.  QK_PIPELINE goes right before a loop that must reach II=1.
 */
#if defined(QK_XILINX)
#define QK_PIPELINE __attribute__((xcl_pipeline_loop(1)))
#define QK_TASK __attribute__((reqd_work_group_size(1, 1, 1)))
#define QK_ROM __attribute__((xcl_array_partition(complete, 1)))
#elif defined(QK_INTEL) || defined(INTELFPGA_CL)
#define QK_PIPELINE _Pragma("ii 1")
#define QK_TASK __attribute__((max_global_work_dim(0))) __attribute__((reqd_work_group_size(1, 1, 1)))
#define QK_ROM __attribute__((register))
#else
#define QK_PIPELINE
#define QK_TASK __attribute__((reqd_work_group_size(1, 1, 1)))
#define QK_ROM
#endif
#define QK_UNROLL _Pragma("unroll")

/* Element dtypes, as qlora_kernels.formats.dtype_code numbers them. */
#define QK_F32 0
#define QK_BF16 1
#define QK_F16 2

/* Inputs and outputs of another dtype travel as raw bytes and are converted here: PoCL
 * has no cl_khr_fp16, so halves go through vload_half/vstore_half only. */
inline float qk_load(const __global uchar* p, int dtype, long i) {
  if (dtype == QK_F32) return ((const __global float*)p)[i];
  if (dtype == QK_F16) return vload_half(i, (const __global half*)p);
  return as_float((uint)((const __global ushort*)p)[i] << 16);
}

/* fp32 -> bf16 rounding to nearest even, as torch's .to(torch.bfloat16) does for the
 * finite values a decoder produces. */
inline ushort qk_bf16(float v) {
  const uint u = as_uint(v);
  return (ushort)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline void qk_store(__global uchar* p, int dtype, long i, float v) {
  if (dtype == QK_F32) ((__global float*)p)[i] = v;
  else if (dtype == QK_F16) vstore_half_rte(v, i, (__global half*)p);
  else ((__global ushort*)p)[i] = qk_bf16(v);
}

/* Stores 16 consecutive outputs starting at element 16*c. */
inline void qk_store16(__global uchar* p, int dtype, long c, float16 v) {
  if (dtype == QK_F32) {
    vstore16(v, c, (__global float*)p);
  } else if (dtype == QK_F16) {
    vstore_half16_rte(v, c, (__global half*)p);
  } else {
    const uint16 u = as_uint16(v);
    vstore16(convert_ushort16((u + (uint16)(0x7FFFu) + ((u >> 16) & (uint16)(1u))) >> 16), c,
             (__global ushort*)p);
  }
}

/* A weight element decoded exactly as dequantize_4bit decodes it (one fp32 multiply). */
inline float qk_weight(const __global uchar* packed, const __global float* absmax, long i, int bs_shift,
                       __constant const float* code) {
  const uchar b = packed[i >> 1];
  return code[(i & 1) ? (b & 15) : (b >> 4)] * absmax[i >> bs_shift];
}

/* The 16 codes as one vector: NDRange kernels decode with a lane permutation. */
inline float16 qk_codebook16(int qt) { return vload16(0, QK_CODE[qt]); }

/* t[n] lane by lane: a vector subscript by a vector, which LLVM turns into one permute
 * (vpermd on x86; PoCL's shuffle() builtins are out-of-line calls and do not get there). */
inline float16 qk_pick16(float16 t, uint16 n) {
  return (float16)(t[n.s0], t[n.s1], t[n.s2], t[n.s3], t[n.s4], t[n.s5], t[n.s6], t[n.s7],
                   t[n.s8], t[n.s9], t[n.sa], t[n.sb], t[n.sc], t[n.sd], t[n.se], t[n.sf]);
}

/* 32 weights of one block from 16 packed bytes, as (even elements, odd elements), from the
 * scaled codebook t = codebook * absmax: t[nibble] is the very fp32 product
 * code[nibble] * absmax, computed once per block instead of once per weight, and keeping
 * the two nibble planes apart saves interleaving them (callers deinterleave x instead). */
inline void qk_decode32_split(uchar16 b, float16 t, float16* even, float16* odd) {
  *even = qk_pick16(t, convert_uint16(b >> (uchar16)(4)));
  *odd = qk_pick16(t, convert_uint16(b & (uchar16)(15)));
}

/* 16 consecutive decoded weights from 8 packed bytes, all in the block whose scale is am.
 * The nibbles are interleaved by integer arithmetic (no shuffle call): on a little-endian
 * device, 16-bit lane j holds element 2j in its low byte. */
inline float16 qk_decode16(uchar8 b, float am, float16 cb) {
#ifdef __ENDIAN_LITTLE__
  const ushort8 pairs = convert_ushort8(b >> (uchar8)(4)) | (convert_ushort8(b & (uchar8)(15)) << (ushort8)(8));
  const uint16 n = convert_uint16(as_uchar16(pairs));
#else
  const uchar8 h = b >> (uchar8)(4), l = b & (uchar8)(15);
  const uint16 n = convert_uint16((uchar16)(h.s0, l.s0, h.s1, l.s1, h.s2, l.s2, h.s3, l.s3,
                                            h.s4, l.s4, h.s5, l.s5, h.s6, l.s6, h.s7, l.s7));
#endif
  return qk_pick16(cb, n) * am;
}

/* The same from a ROM array: FPGA style, where the codebook is a 16-word register file
 * read by 16 (or 32) ports at once. */
inline float16 qk_decode16_rom(uchar8 b, float am, const float* rom) {
  return (float16)(rom[b.s0 >> 4], rom[b.s0 & 15], rom[b.s1 >> 4], rom[b.s1 & 15],
                   rom[b.s2 >> 4], rom[b.s2 & 15], rom[b.s3 >> 4], rom[b.s3 & 15],
                   rom[b.s4 >> 4], rom[b.s4 & 15], rom[b.s5 >> 4], rom[b.s5 & 15],
                   rom[b.s6 >> 4], rom[b.s6 & 15], rom[b.s7 >> 4], rom[b.s7 & 15]) * am;
}

inline float qk_hsum16(float16 a) {
  const float8 h = a.lo + a.hi;
  const float4 q = h.lo + h.hi;
  const float2 d = q.lo + q.hi;
  return d.x + d.y;
}

/* Tables dump: lets the tests prove the device copy equals qlora_kernels.formats bit for bit. */
__kernel void qk_dump_tables(__global float* code, __global float* bounds, __global uchar* order,
                             __global float* floor_value) {
  for (int q = 0; q < QK_NUM_QTYPES; q++) {
    for (int j = 0; j < 16; j++) code[q * 16 + j] = QK_CODE[q][j];
    for (int j = 0; j < 15; j++) bounds[q * 15 + j] = QK_BOUNDS[q][j];
    for (int j = 0; j < 16; j++) order[q * 16 + j] = QK_ORDER[q][j];
  }
  floor_value[0] = QK_ABSMAX_FLOOR;
}
