// Verilator harness of qk_decode_top: reads cases from stdin, drives the code and absmax
// streams as fast as the unit accepts them, writes every output beat and the measured
// cycle counts to stdout. Golden data and the comparison are the Python test's
// (tests/test_rtl.py), from the reference backend.
//
// stdin:  <cases>, then per case: <beats_per_block> <beats> <blocks>, 16 codebook words,
//         <beats> x (LANES/8 code words: word w holds code bytes 4w..4w+3, byte 0 lowest),
//         <blocks> absmax words (all hex)
// stdout: per case "case <cycles> <latency> <accepted_per_cycle_min>", then <beats> lines of
//         LANES hex words
#include <cstdint>
#include <cstdio>
#include <memory>
#include <vector>

#include "Vqk_decode_top.h"
#include "verilated.h"

namespace {

struct Tb {
  std::unique_ptr<Vqk_decode_top> top{new Vqk_decode_top};
  uint64_t cycle = 0;
  void tick() {
    top->clk = 0;
    top->eval();
    top->clk = 1;
    top->eval();
    ++cycle;
  }
};

unsigned read_hex() {
  unsigned v = 0;
  if (std::scanf("%x", &v) != 1) {
    std::fprintf(stderr, "tb_decode: malformed input\n");
    std::exit(2);
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  Verilated::commandArgs(argc, argv);
  Tb tb;
  constexpr int LANES = sizeof(tb.top->out_values) * 8 / 32;
  constexpr int CODE_WORDS = LANES / 8;
  const unsigned cases = read_hex();
  for (unsigned c = 0; c < cases; ++c) {
    const unsigned bpb = read_hex(), beats = read_hex(), blocks = read_hex();
    unsigned code[16];
    for (auto& w : code) w = read_hex();
    std::vector<uint32_t> codes(static_cast<size_t>(beats) * CODE_WORDS), absmax(blocks);
    for (auto& w : codes) w = read_hex();
    for (auto& w : absmax) w = read_hex();

    auto* t = tb.top.get();
    t->rst = 1;
    t->in_valid = 0;
    t->s_valid = 0;
    t->cb_we = 0;
    tb.tick();
    tb.tick();
    t->rst = 0;
    for (int i = 0; i < 16; ++i) {  // the codebook, loaded at run time
      t->cb_we = 1;
      t->cb_addr = i;
      t->cb_data = code[i];
      tb.tick();
    }
    t->cb_we = 0;
    t->beats_per_block = bpb;

    std::vector<uint32_t> out;
    out.reserve(static_cast<size_t>(beats) * LANES);
    size_t sent = 0, blk = 0;
    uint64_t first_in = 0, first_out = 0, last_out = 0;
    bool started = false, got_first = false;
    const uint64_t limit = tb.cycle + 16ull * (beats + blocks) + 1000;
    while (out.size() < static_cast<size_t>(beats) * LANES && tb.cycle < limit) {
      t->in_valid = sent < beats;
      if (sent < beats) {
        if (CODE_WORDS == 1) {
          t->in_codes = codes[sent];
        } else {
          uint64_t v = 0;
          for (int w = CODE_WORDS - 1; w >= 0; --w) v = (v << 32) | codes[sent * CODE_WORDS + w];
          t->in_codes = v;
        }
      }
      t->s_valid = blk < blocks;
      t->s_absmax = blk < blocks ? absmax[blk] : 0;
      t->eval();  // combinational ready/handshakes for this cycle's inputs
      const bool beat_taken = t->in_valid && t->in_ready;
      const bool abs_taken = t->s_valid && t->s_ready;
      if (beat_taken && !started) started = true, first_in = tb.cycle;
      tb.tick();
      if (beat_taken) ++sent;
      if (abs_taken) ++blk;
      t->eval();
      if (t->out_valid) {
        if (!got_first) got_first = true, first_out = tb.cycle;
        last_out = tb.cycle;
        for (int j = 0; j < LANES; ++j) out.push_back(t->out_values[j]);
      }
    }
    if (out.size() != static_cast<size_t>(beats) * LANES) {
      std::fprintf(stderr, "tb_decode: case %u stalled after %zu of %u beats\n", c, out.size() / LANES, beats);
      return 1;
    }
    // cycles: first beat accepted to last beat out; latency: first in to first out
    std::printf("case %llu %llu\n", static_cast<unsigned long long>(last_out - first_in + 1),
                static_cast<unsigned long long>(first_out - first_in));
    for (size_t i = 0; i < out.size(); ++i) std::printf(i % LANES == LANES - 1 ? "%08x\n" : "%08x ", out[i]);
  }
  return 0;
}
