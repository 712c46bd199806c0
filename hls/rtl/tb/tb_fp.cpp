// Verilator harness of qk_fp_tb_top: stdin "<n>" then n pairs of hex words (a b); stdout
// n lines "<a+b> <a*b>" (hex). One pair per cycle; results are read <latency> cycles later.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "Vqk_fp_tb_top.h"
#include "verilated.h"

constexpr int kAddLatency = 6, kMulLatency = 8;  // qk_fadd.v, qk_fmul.v

int main(int argc, char** argv) {
  Verilated::commandArgs(argc, argv);
  std::unique_ptr<Vqk_fp_tb_top> top{new Vqk_fp_tb_top};
  unsigned n = 0;
  if (std::scanf("%x", &n) != 1) return 2;
  std::vector<uint32_t> a(n), b(n), sum(n), prod(n);
  for (unsigned i = 0; i < n; ++i)
    if (std::scanf("%x %x", &a[i], &b[i]) != 2) return 2;
  for (unsigned c = 0; c < n + kMulLatency; ++c) {
    top->a = c < n ? a[c] : 0;
    top->b = c < n ? b[c] : 0;
    top->clk = 0;
    top->eval();
    top->clk = 1;
    top->eval();
    // after the edge of cycle c, the results of the pair fed latency-1 cycles earlier
    if (c + 1 >= kAddLatency && c + 1 - kAddLatency < n) sum[c + 1 - kAddLatency] = top->sum;
    if (c + 1 >= kMulLatency && c + 1 - kMulLatency < n) prod[c + 1 - kMulLatency] = top->prod;
  }
  for (unsigned i = 0; i < n; ++i) std::printf("%08x %08x\n", sum[i], prod[i]);
  return 0;
}
