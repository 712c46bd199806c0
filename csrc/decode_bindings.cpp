// Bindings of the native decode step (decode.h). Python builds a DecodePlan from a model's
// tensors (integrations/hf_decode.py), passing data pointers with the element counts it
// allocated; every count and every size is checked here against the model's shape before
// the first step, and the plan refuses to step until every layer is complete. The plan
// does not own the tensors: its Python owner keeps them alive and builds a new plan when
// one of them changes.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "decode.h"
#include "quant4.h"
#include "require.h"

namespace py = pybind11;

namespace {

std::string s(int64_t v) { return std::to_string(v); }

void numel_is(const std::string& what, int64_t numel, int64_t expected) {
  QK_REQUIRE(numel == expected, what + " has " + s(numel) + " elements, expected " + s(expected));
}

// The product of sizes that an element count is checked against: one that wraps would let a
// short buffer pass numel_is.
int64_t product(const std::string& what, std::initializer_list<int64_t> sizes) {
  int64_t p = 1;
  for (int64_t v : sizes)
    QK_REQUIRE(v >= 0 && !__builtin_mul_overflow(p, v, &p) && p <= (int64_t(1) << 60), what + " is too large");
  return p;
}

// Slots of a layer's projections, in the order Python names them.
enum Slot { kAttn0 = 0, kAttn1, kAttn2, kO, kMlp0, kMlp1, kDown, kSlots };
const char* const kSlotName[kSlots] = {"attention input 0", "attention input 1", "attention input 2", "o_proj",
                                       "mlp input 0",       "mlp input 1",       "down_proj"};

class DecodePlan {
 public:
  DecodePlan(int64_t layers, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_size,
             int64_t intermediate, double eps, uintptr_t cos, uintptr_t sin, int64_t table_numel,
             int64_t positions, uintptr_t final_norm, int64_t final_norm_numel)
      : layers_(static_cast<size_t>(layers)), set_(static_cast<size_t>(layers) * kSlots + 2 * layers, false) {
    QK_REQUIRE(layers >= 1 && hidden >= 1 && heads >= 1 && kv_heads >= 1 && head_size >= 2 && intermediate >= 1,
               "sizes must be >= 1 (head_size >= 2)");
    for (int64_t v : {layers, hidden, heads, kv_heads, head_size, intermediate, positions})
      QK_REQUIRE(v <= (int64_t(1) << 31), "sizes must be <= 2^31, got " + s(v));
    product("the attention buffer", {heads + 2 * kv_heads, head_size});
    product("the MLP buffer", {2, intermediate});
    QK_REQUIRE(head_size % 2 == 0, "head_size must be even (rotate_half), got " + s(head_size));
    QK_REQUIRE(heads % kv_heads == 0, "heads=" + s(heads) + " is not a multiple of kv_heads=" + s(kv_heads));
    QK_REQUIRE(positions >= 1, "the rotary table needs >= 1 position");
    numel_is("the rotary table", table_numel, product("the rotary table", {positions, head_size / 2}));
    numel_is("the final norm's weight", final_norm_numel, hidden);
    QK_REQUIRE(cos && sin && final_norm, "null data pointer");
    m_ = qk::DecodeModel{layers, hidden, heads, kv_heads, head_size, intermediate, 0,
                         static_cast<float>(eps), 0.f, ptr<const float>(cos), ptr<const float>(sin), positions,
                         ptr<const float>(final_norm), nullptr};
    for (auto& L : layers_) L = qk::DecodeLayer{};
  }

  void set_norms(int64_t l, uintptr_t n1, int64_t n1_numel, uintptr_t n2, int64_t n2_numel) {
    qk::DecodeLayer& L = layer(l);
    numel_is("layer " + s(l) + "'s input norm weight", n1_numel, m_.hidden);
    numel_is("layer " + s(l) + "'s post-attention norm weight", n2_numel, m_.hidden);
    QK_REQUIRE(n1 && n2, "null data pointer");
    L.norm1 = ptr<const float>(n1);
    L.norm2 = ptr<const float>(n2);
    norms_set(l) = true;
  }

  // A 4-bit weight (packed != 0: packed bytes, decoded fp32 absmax, 16-entry code) or a
  // dense [N, K] fp32 one (dense != 0); bias [N] or 0; a LoRA adapter (r >= 1: A [r, K],
  // B [N, r], fp32 contiguous) or r = 0.
  void set_proj(int64_t l, int slot, int64_t N, int64_t K, uintptr_t packed, int64_t packed_numel, uintptr_t absmax,
                int64_t absmax_numel, uintptr_t code, int64_t code_numel, int64_t blocksize, uintptr_t dense,
                int64_t dense_numel, uintptr_t bias, int64_t bias_numel, uintptr_t a, int64_t a_numel, uintptr_t b,
                int64_t b_numel, int64_t r, double scaling, int64_t out_offset) {
    qk::DecodeLayer& L = layer(l);
    QK_REQUIRE(slot >= 0 && slot < kSlots, "slot must be in [0, " + s(kSlots) + "), got " + s(slot));
    const std::string what = "layer " + s(l) + " " + kSlotName[slot];
    QK_REQUIRE(N >= 1 && K >= 1, what + ": N and K must be >= 1");
    QK_REQUIRE((packed != 0) != (dense != 0), what + ": exactly one of a 4-bit and a dense weight");
    qk::DecodeProj p{};
    if (packed) {
      QK_REQUIRE(blocksize >= 1, what + ": blocksize must be >= 1");
      numel_is(what + "'s packed bytes", packed_numel, qk::packed_bytes(product(what, {N, K})));
      numel_is(what + "'s absmax", absmax_numel, qk::block_count(N * K, blocksize));
      numel_is(what + "'s code", code_numel, 16);
      QK_REQUIRE(absmax && code, "null data pointer");
      p.w4 = qk::Weight4{ptr<const uint8_t>(packed), ptr<const float>(absmax), ptr<const float>(code), N, K, blocksize};
    } else {
      numel_is(what + "'s dense weight", dense_numel, product(what, {N, K}));
      p.dense = qk::DenseWeight{ptr<const float>(dense), N, K, K};
    }
    if (bias) numel_is(what + "'s bias", bias_numel, N);
    p.bias = ptr<const float>(bias);
    QK_REQUIRE(r >= 0 && r <= 256, what + ": LoRA rank must be in [0, 256], got " + s(r));
    if (r > 0) {
      numel_is(what + "'s lora_A", a_numel, product(what, {r, K}));
      numel_is(what + "'s lora_B", b_numel, product(what, {N, r}));
      QK_REQUIRE(a && b, "null data pointer");
      p.lora = qk::LoraTail{ptr<const float>(a), ptr<const float>(b), r, static_cast<float>(scaling)};
    }
    QK_REQUIRE(out_offset >= 0, what + ": out_offset must be >= 0");
    p.out_offset = out_offset;
    const int64_t q = m_.heads * m_.head_size, kv = m_.kv_heads * m_.head_size;
    // (input width, output buffer width) of each slot
    const bool attn = slot <= kAttn2, mlp = slot == kMlp0 || slot == kMlp1;
    const int64_t in = slot == kO ? q : slot == kDown ? m_.intermediate : m_.hidden;
    const int64_t buf = attn ? q + 2 * kv : mlp ? 2 * m_.intermediate : m_.hidden;
    QK_REQUIRE(K == in, what + ": in_features " + s(K) + ", expected " + s(in));
    QK_REQUIRE(out_offset + N <= buf, what + ": outputs [" + s(out_offset) + ", " + s(out_offset + N) +
                                          ") exceed its buffer of " + s(buf));
    if (slot == kO || slot == kDown) QK_REQUIRE(N == buf && out_offset == 0, what + ": out_features must be " + s(buf));
    if (attn)
      L.attn_in[slot - kAttn0] = p;
    else if (mlp)
      L.mlp_in[slot - kMlp0] = p;
    else
      (slot == kO ? L.o : L.down) = p;
    set_[static_cast<size_t>(l) * kSlots + slot] = true;
  }

  // The caches: [kv_heads, capacity, head_size] each (the plan is built again to grow them).
  void set_cache(int64_t l, uintptr_t k, int64_t k_numel, uintptr_t v, int64_t v_numel, int64_t capacity) {
    qk::DecodeLayer& L = layer(l);
    QK_REQUIRE(capacity >= 1, "capacity must be >= 1");
    QK_REQUIRE(m_.capacity == 0 || m_.capacity == capacity, "every layer's cache has the same capacity");
    const int64_t cache = product("the cache", {m_.kv_heads, capacity, m_.head_size});
    product("the attention scores", {m_.heads, capacity});  // finish() sizes its scratch so
    numel_is("layer " + s(l) + "'s key cache", k_numel, cache);
    numel_is("layer " + s(l) + "'s value cache", v_numel, cache);
    QK_REQUIRE(k && v, "null data pointer");
    m_.capacity = capacity;
    L.k_cache = ptr<float>(k);
    L.v_cache = ptr<float>(v);
    cache_set(l) = true;
  }

  // Which projections fill the attention / MLP buffers: 3 (q, k, v) or 1 (qkv); 2 or 1.
  void finish(int n_attn_in, int n_mlp_in, double scale) {
    QK_REQUIRE(n_attn_in == 1 || n_attn_in == 3, "n_attn_in must be 1 or 3");
    QK_REQUIRE(n_mlp_in == 1 || n_mlp_in == 2, "n_mlp_in must be 1 or 2");
    const int64_t q = m_.heads * m_.head_size, kv = m_.kv_heads * m_.head_size;
    for (size_t l = 0; l < layers_.size(); ++l) {
      qk::DecodeLayer& L = layers_[l];
      const std::string what = "layer " + s(static_cast<int64_t>(l));
      QK_REQUIRE(norms_set(static_cast<int64_t>(l)) && cache_set(static_cast<int64_t>(l)),
                 what + ": norms or cache not set");
      for (int slot : {int(kO), int(kDown)})
        QK_REQUIRE(set_[l * kSlots + slot], what + ": " + kSlotName[slot] + " not set");
      // the inputs must tile their buffer exactly, in order
      int64_t at = 0;
      for (int i = 0; i < n_attn_in; ++i) {
        QK_REQUIRE(set_[l * kSlots + kAttn0 + i], what + ": " + kSlotName[kAttn0 + i] + " not set");
        QK_REQUIRE(L.attn_in[i].out_offset == at, what + ": the attention inputs do not tile [q | k | v]");
        at += L.attn_in[i].N();
      }
      QK_REQUIRE(at == q + 2 * kv, what + ": the attention inputs give " + s(at) + " outputs, expected " +
                                       s(q + 2 * kv));
      at = 0;
      for (int i = 0; i < n_mlp_in; ++i) {
        QK_REQUIRE(set_[l * kSlots + kMlp0 + i], what + ": " + kSlotName[kMlp0 + i] + " not set");
        QK_REQUIRE(L.mlp_in[i].out_offset == at, what + ": the MLP inputs do not tile [gate | up]");
        at += L.mlp_in[i].N();
      }
      QK_REQUIRE(at == 2 * m_.intermediate, what + ": the MLP inputs give " + s(at) + " outputs, expected " +
                                                s(2 * m_.intermediate));
      L.n_attn_in = n_attn_in;
      L.n_mlp_in = n_mlp_in;
    }
    m_.scale = static_cast<float>(scale);
    m_.layer = layers_.data();
    scratch_.assign(static_cast<size_t>(qk::decode_scratch_floats(m_)), 0.f);
    ready_ = true;
  }

  // h [hidden]: the embedding of the token at position pos in, the final-normed hidden
  // state out; the caches hold positions [0, pos).
  void step(uintptr_t h, int64_t h_numel, int64_t pos, int nthreads) {
    QK_REQUIRE(ready_, "the plan is not finished");
    numel_is("h", h_numel, m_.hidden);
    QK_REQUIRE(h, "null data pointer");
    QK_REQUIRE(pos >= 0 && pos < m_.capacity, "pos=" + s(pos) + " is outside the cache's capacity " + s(m_.capacity));
    QK_REQUIRE(pos < m_.positions, "pos=" + s(pos) + " is beyond the rotary table's " + s(m_.positions) +
                                       " positions (the model's context length)");
    qk::decode_step(m_, ptr<float>(h), pos, scratch_.data(), nthreads < 1 ? 1 : nthreads);
  }

  int64_t capacity() const { return m_.capacity; }

 private:
  qk::DecodeLayer& layer(int64_t l) {
    QK_REQUIRE(l >= 0 && l < static_cast<int64_t>(layers_.size()), "layer " + s(l) + " is out of range");
    ready_ = false;  // a changed layer must be checked again
    return layers_[static_cast<size_t>(l)];
  }
  std::vector<bool>::reference norms_set(int64_t l) { return set_[layers_.size() * kSlots + 2 * size_t(l)]; }
  std::vector<bool>::reference cache_set(int64_t l) { return set_[layers_.size() * kSlots + 2 * size_t(l) + 1]; }

  qk::DecodeModel m_{};
  std::vector<qk::DecodeLayer> layers_;
  std::vector<bool> set_;
  std::vector<float> scratch_;
  bool ready_ = false;
};

}  // namespace

void register_decode(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<DecodePlan>(m, "DecodePlan",
                         "One token through every layer of a Llama-family decoder with a KV cache (decode.h).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, uintptr_t, uintptr_t,
                    int64_t, int64_t, uintptr_t, int64_t>(),
           py::arg("layers"), py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_size"),
           py::arg("intermediate"), py::arg("eps"), py::arg("cos_ptr"), py::arg("sin_ptr"),
           py::arg("table_numel"), py::arg("positions"), py::arg("final_norm_ptr"), py::arg("final_norm_numel"))
      .def("set_norms", &DecodePlan::set_norms)
      .def("set_proj", &DecodePlan::set_proj)
      .def("set_cache", &DecodePlan::set_cache)
      .def("finish", &DecodePlan::finish)
      .def("step", &DecodePlan::step, nogil)
      .def_property_readonly("capacity", &DecodePlan::capacity);
}
