// The project's own stand-ins for the vendor's wide-integer and stream types.
//
// Under Vitis HLS (__SYNTHESIS__, or QK_VENDOR_TYPES for a vendor C-simulation) the
// kernels use ap_uint<512> and hls::stream from the tool's own installation; nothing of
// the vendor is copied here. Under plain g++ the same kernel source compiles against the
// small types below, which behave like the vendor's in C-simulation: a stream is an
// unbounded FIFO (DATAFLOW stages run one after another), a word is 512 bits.
//
// Byte b of a word is bits [8b+7 : 8b], i.e. the b-th byte in memory order: a packed
// bitsandbytes buffer read as words keeps its byte order (even element in the high nibble).
#ifndef QK_HLS_TYPES_H
#define QK_HLS_TYPES_H

#include <cstdint>

#include "qk_hls_params.h"

#if defined(__SYNTHESIS__) || defined(QK_VENDOR_TYPES)
#include <ap_int.h>
#include <hls_stream.h>

typedef ap_uint<QK_WORD_BITS> qk_word_t;
template <class T>
using qk_stream = hls::stream<T>;

inline unsigned qk_byte(const qk_word_t& w, int b) { return w.range(8 * b + 7, 8 * b); }
inline uint32_t qk_u32(const qk_word_t& w, int i) { return w.range(32 * i + 31, 32 * i); }
inline void qk_set_u32(qk_word_t& w, int i, uint32_t v) { w.range(32 * i + 31, 32 * i) = v; }

#else
#include <deque>
#include <stdexcept>

struct qk_word_t {
  uint32_t u[QK_WORD_BITS / 32];
};

// A FIFO with the vendor stream's read/write/empty interface. Reading an empty stream is
// a deadlock in hardware; here it is an error, so a testbench cannot pass on one.
template <class T>
class qk_stream {
 public:
  qk_stream() = default;
  explicit qk_stream(const char*) {}
  qk_stream(const qk_stream&) = delete;
  qk_stream& operator=(const qk_stream&) = delete;
  void write(const T& v) { q_.push_back(v); }
  T read() {
    if (q_.empty()) throw std::runtime_error("qk_stream: read from an empty stream (a hardware deadlock)");
    T v = q_.front();
    q_.pop_front();
    return v;
  }
  bool empty() const { return q_.empty(); }
  std::size_t size() const { return q_.size(); }

 private:
  std::deque<T> q_;
};

inline unsigned qk_byte(const qk_word_t& w, int b) { return (w.u[b >> 2] >> (8 * (b & 3))) & 0xFFu; }
inline uint32_t qk_u32(const qk_word_t& w, int i) { return w.u[i]; }
inline void qk_set_u32(qk_word_t& w, int i, uint32_t v) { w.u[i] = v; }
#endif

// fp32 <-> bits without undefined behaviour, the same under both compilers.
inline float qk_f32(uint32_t bits) {
  union {
    uint32_t u;
    float f;
  } c;
  c.u = bits;
  return c.f;
}

inline uint32_t qk_bits(float f) {
  union {
    uint32_t u;
    float f;
  } c;
  c.f = f;
  return c.u;
}

inline float qk_word_f32(const qk_word_t& w, int i) { return qk_f32(qk_u32(w, i)); }
inline void qk_word_set_f32(qk_word_t& w, int i, float v) { qk_set_u32(w, i, qk_bits(v)); }

// The absmax of each 32-element group of a 128-element beat (QK_SCALE_SLOTS slots; a
// block of 64 fills two slots with one value, a block of >= 128 all four).
struct qk_scale4_t {
  float a[QK_SCALE_SLOTS];
};

#endif  // QK_HLS_TYPES_H
