// The decode step of decode.h: the layer loop over the dispatched kernels. Baseline ISA:
// the loop only moves pointers; the arithmetic is in the per-ISA kernels it calls, except
// the rope and the residual adds (a few hundred floats per layer), written so that they
// round as transformers' ops do (each product rounded, then the sum: -ffp-contract=off).
#include <algorithm>

#include "decode.h"
#include "norm_act.h"

namespace qk {

namespace {

void project(const DecodeProj& p, const float* x, float* buf, float* u, int nthreads) {
  float* y = buf + p.out_offset;
  if (p.w4.packed)
    linear4_kernels().forward(x, 1, p.w4.K, p.w4, p.bias, y, p.w4.N, nthreads);
  else
    dense_kernels().forward(x, 1, p.dense.K, p.dense, p.bias, y, p.dense.N, nthreads);
  if (p.lora.r > 0) {
    const int64_t K = p.w4.packed ? p.w4.K : p.dense.K;
    lora4_tail()(x, 1, K, K, nullptr, 0, p.lora, y, p.N(), p.N(), u);
  }
}

// transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, rotate_half(x) =
// [-x2, x1], the table's two halves equal (checked by the plan's builder).
void rope(float* x, int64_t nheads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < nheads; ++h) {
    float* v = x + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      const float lo = a * cos[i] + (-b) * sin[i];
      const float hi = b * cos[i] + a * sin[i];
      v[i] = lo;
      v[i + half] = hi;
    }
  }
}

void add(float* h, const float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = h[i] + d[i];
}

struct Scratch {
  float *x, *qkv, *att, *tmp, *gu, *act, *u, *scores;
};

Scratch carve(const DecodeModel& m, float* s) {
  const int64_t q = m.heads * m.head_size, kv = m.kv_heads * m.head_size;
  Scratch r{};
  r.x = s;
  s += m.hidden;
  r.qkv = s;
  s += q + 2 * kv;
  r.att = s;
  s += q;
  r.tmp = s;
  s += m.hidden;
  r.gu = s;
  s += 2 * m.intermediate;
  r.act = s;
  s += m.intermediate;
  r.u = s;
  s += 256;  // the LoRA tail's u: rank <= 256 (checked by the plan's builder)
  r.scores = s;
  return r;
}

}  // namespace

int64_t decode_scratch_floats(const DecodeModel& m) {
  const int64_t q = m.heads * m.head_size, kv = m.kv_heads * m.head_size;
  return m.hidden + (q + 2 * kv) + q + m.hidden + 3 * m.intermediate + 256 + m.heads * m.capacity;
}

void decode_step(const DecodeModel& m, float* h, int64_t pos, float* scratch, int nthreads) {
  const NormActKernels& na = norm_act_kernels();
  const Scratch s = carve(m, scratch);
  const int64_t hd = m.head_size, q = m.heads * hd, kv = m.kv_heads * hd, half = hd / 2;
  const float* cos = m.cos + pos * half;
  const float* sin = m.sin + pos * half;
  const int64_t n = pos + 1;
  float rstd;
  for (int64_t l = 0; l < m.layers; ++l) {
    const DecodeLayer& L = m.layer[l];
    na.rms_forward_row(h, L.norm1, m.hidden, m.eps, s.x, &rstd);
    for (int i = 0; i < L.n_attn_in; ++i) project(L.attn_in[i], s.x, s.qkv, s.u, nthreads);
    float* qv = s.qkv;
    float* kn = s.qkv + q;
    float* vn = s.qkv + q + kv;
    rope(qv, m.heads, hd, cos, sin);
    rope(kn, m.kv_heads, hd, cos, sin);
    for (int64_t g = 0; g < m.kv_heads; ++g) {
      std::copy(kn + g * hd, kn + (g + 1) * hd, L.k_cache + (g * m.capacity + pos) * hd);
      std::copy(vn + g * hd, vn + (g + 1) * hd, L.v_cache + (g * m.capacity + pos) * hd);
    }
    decode_attn()(qv, L.k_cache, L.v_cache, m.heads, m.kv_heads, hd, m.capacity, 0, n, m.scale, s.att, s.scores,
                  nthreads);
    project(L.o, s.att, s.tmp, s.u, nthreads);
    add(h, s.tmp, m.hidden);
    na.rms_forward_row(h, L.norm2, m.hidden, m.eps, s.x, &rstd);
    for (int i = 0; i < L.n_mlp_in; ++i) project(L.mlp_in[i], s.x, s.gu, s.u, nthreads);
    na.swiglu_forward(s.gu, s.gu + m.intermediate, m.intermediate, s.act);
    project(L.down, s.act, s.tmp, s.u, nthreads);
    add(h, s.tmp, m.hidden);
  }
  na.rms_forward_row(h, m.final_norm, m.hidden, m.eps, s.x, &rstd);
  std::copy(s.x, s.x + m.hidden, h);
}

}  // namespace qk
