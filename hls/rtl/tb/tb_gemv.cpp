// Verilator harness of qk_gemv_unit. stdin (hex words): <rows> <tiles>, 16 codebook words,
// tiles*LANES x words, then tiles*rows beats (tile-major, row-minor), each LANES/8 code words
// (word w = code bytes 4w..4w+3, byte 0 lowest) and SLOTS scale words. stdout: "cycles <c>"
// (first beat in to last sum written back) and <rows> y words.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "Vqk_gemv_unit.h"
#include "verilated.h"

namespace {

unsigned rd() {
  unsigned v = 0;
  if (std::scanf("%x", &v) != 1) {
    std::fprintf(stderr, "tb_gemv: malformed input\n");
    std::exit(2);
  }
  return v;
}

// Verilator ports: uint32_t up to 32 bits, uint64_t up to 64, VlWide (uint32_t words) above;
// all little-endian words, so a copy of the words fills any of them.
template <class T>
void put(T& port, const uint32_t* words) {
  std::memcpy(static_cast<void*>(&port), words, sizeof(T));
}

}  // namespace

int main(int argc, char** argv) {
  Verilated::commandArgs(argc, argv);
  std::unique_ptr<Vqk_gemv_unit> t{new Vqk_gemv_unit};
  constexpr int CODE_WORDS = sizeof(t->in_codes) / 4, SCALE_WORDS = sizeof(t->in_scales) / 4;
  constexpr int LANES = CODE_WORDS * 8;
  uint64_t cycle = 0;
  auto tick = [&] {
    t->clk = 0;
    t->eval();
    t->clk = 1;
    t->eval();
    ++cycle;
  };
  const unsigned rows = rd(), tiles = rd();
  unsigned code[16];
  for (auto& c : code) c = rd();
  std::vector<uint32_t> x(static_cast<size_t>(tiles) * LANES);
  for (auto& v : x) v = rd();
  const size_t beats = static_cast<size_t>(tiles) * rows;
  std::vector<uint32_t> codes(beats * CODE_WORDS), scales(beats * SCALE_WORDS);
  for (size_t b = 0; b < beats; ++b) {
    for (int w = 0; w < CODE_WORDS; ++w) codes[b * CODE_WORDS + w] = rd();
    for (int w = 0; w < SCALE_WORDS; ++w) scales[b * SCALE_WORDS + w] = rd();
  }

  t->rst = 1;
  t->in_valid = 0;
  t->cb_we = 0;
  t->x_we = 0;
  tick();
  tick();
  t->rst = 0;
  for (int i = 0; i < 16; ++i) {  // the codebook, at run time
    t->cb_we = 1;
    t->cb_addr = i;
    t->cb_data = code[i];
    tick();
  }
  t->cb_we = 0;
  for (size_t i = 0; i < x.size(); ++i) {  // x, on chip
    t->x_we = 1;
    t->x_addr = static_cast<uint32_t>(i);
    t->x_data = x[i];
    tick();
  }
  t->x_we = 0;
  t->rows = rows;
  const uint64_t start = cycle;
  for (size_t b = 0; b < beats; ++b) {  // one beat per cycle
    t->in_valid = 1;
    put(t->in_codes, &codes[b * CODE_WORDS]);
    put(t->in_scales, &scales[b * SCALE_WORDS]);
    tick();
  }
  t->in_valid = 0;
  const uint64_t limit = cycle + 10000;
  while (t->beats_done < beats && cycle < limit) tick();
  if (t->beats_done != beats) {
    std::fprintf(stderr, "tb_gemv: %u of %zu beats written back\n", t->beats_done, beats);
    return 1;
  }
  std::printf("cycles %llu\n", static_cast<unsigned long long>(cycle - start));
  for (unsigned n = 0; n < rows; ++n) {
    t->rd_addr = n;
    tick();
    std::printf("%08x\n", t->rd_data);
  }
  return 0;
}
