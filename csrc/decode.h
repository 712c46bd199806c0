// qlora-kernels: one decode step of a Llama-family decoder (Llama, SmolLM2, Phi-3) with a
// KV cache, torch-free: every layer of one token in a single native call, so that a
// generated token costs the kernels' time and not ~15 Python-level operator calls per
// layer (docs/onnx.md, "Our torch decode step"). The arithmetic is the layers' own:
//
//   x  = rms_norm(h, norm1)                      (norm_act.h)
//   qkv = projections of x                       (linear4.h or dense.h, + bias, + LoRA: lora4.h)
//   q, k = rotate_half rope at pos               (q*cos + rotate_half(q)*sin, as transformers)
//   cache[pos] = k, v;  a = softmax(q k^T * scale) v over positions [0, pos] (GQA; no sliding
//   window: transformers keeps those in another cache layout, which the step refuses)
//   h += o(a);  x = rms_norm(h, norm2);  h += down(silu(gate(x)) * up(x))
//
// and at the end out = rms_norm(h, final_norm). The caller (Python) owns every buffer,
// checks every size when it builds the plan (decode_bindings.cpp), and computes the head.
#pragma once
#include <cstdint>

#include "dense.h"
#include "linear4.h"
#include "lora4.h"

namespace qk {

struct DecodeProj {
  Weight4 w4;          // 4-bit weight (w4.packed != null) ...
  DenseWeight dense;   // ... or a dense fp32 one
  const float* bias;   // [N] or null
  LoraTail lora;       // lora.r == 0: no adapter
  int64_t out_offset;  // the outputs go to buf[out_offset, out_offset + N)
  int64_t N() const { return w4.packed ? w4.N : dense.N; }
};

struct DecodeLayer {
  const float* norm1;  // [hidden]
  const float* norm2;
  DecodeProj attn_in[3];  // q, k, v into one [q | k | v] buffer (Phi-3: one qkv_proj)
  int n_attn_in;
  DecodeProj o;
  DecodeProj mlp_in[2];  // gate, up into one [gate | up] buffer (Phi-3: one gate_up_proj)
  int n_mlp_in;
  DecodeProj down;
  float* k_cache;  // [kv_heads, capacity, head_size]
  float* v_cache;
};

struct DecodeModel {
  int64_t layers, hidden, heads, kv_heads, head_size, intermediate, capacity;
  float eps, scale;    // RMSNorm epsilon; the attention's 1/sqrt(head_size)
  const float* cos;    // [positions, head_size / 2]
  const float* sin;
  int64_t positions;
  const float* final_norm;
  const DecodeLayer* layer;  // [layers]
};

// Floats of scratch one step needs.
int64_t decode_scratch_floats(const DecodeModel& m);

// h [hidden]: the token's embedding in, the last layer's output after the final norm out.
// The cache holds positions [0, pos) and gets pos. pos < min(capacity, positions).
void decode_step(const DecodeModel& m, float* h, int64_t pos, float* scratch, int nthreads);

// Attention of one query token over the cache (decode_attn_*.cpp, one per ISA path):
// q [heads, head_size] (rotated), caches [kv_heads, capacity, head_size], positions
// [start, n) attended; out [heads, head_size]; scores: n floats of scratch per head.
// Head h reads kv head h / (heads / kv_heads). Softmax in fp32 with the row maximum
// subtracted, exp as the SwiGLU kernels compute it (norm_act.h).
using DecodeAttnFn = void (*)(const float* q, const float* k_cache, const float* v_cache, int64_t heads,
                              int64_t kv_heads, int64_t head_size, int64_t capacity, int64_t start, int64_t n,
                              float scale, float* out, float* scores, int nthreads);
const DecodeAttnFn& decode_attn();  // the current ISA path (dispatch.h)

void decode_attn_scalar(const float* q, const float* k_cache, const float* v_cache, int64_t heads, int64_t kv_heads,
                        int64_t head_size, int64_t capacity, int64_t start, int64_t n, float scale, float* out,
                        float* scores, int nthreads);
#if defined(QK_X86)
void decode_attn_avx2(const float* q, const float* k_cache, const float* v_cache, int64_t heads, int64_t kv_heads,
                      int64_t head_size, int64_t capacity, int64_t start, int64_t n, float scale, float* out,
                      float* scores, int nthreads);
void decode_attn_avx512(const float* q, const float* k_cache, const float* v_cache, int64_t heads, int64_t kv_heads,
                        int64_t head_size, int64_t capacity, int64_t start, int64_t n, float scale, float* out,
                        float* scores, int nthreads);
#endif

}  // namespace qk
