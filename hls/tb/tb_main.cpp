// C-simulation testbench: `qk_tb <kernel> <case-dir>` runs one top function (through the
// host call sequence of hls/host) on golden data and compares with the reference's result.
// Exit status 0 = PASS. Built with plain g++ (see tests/test_hls_csim.py).
#include <cstdio>
#include <exception>
#include <string>

#include "../host/qk_host.h"
#include "tb_io.h"

namespace {

bool run_decode(const tb::Case& c) {
  const int64_t n = c.i("n"), bs = c.i("blocksize");
  const auto packed = c.load<uint8_t>("packed", (n + 1) / 2);
  const auto absmax = c.load<float>("absmax", (n + bs - 1) / bs);
  const auto code = c.load<float>("code", 16);
  std::vector<float> out(static_cast<size_t>(n));
  qk_host::dequantize_4bit(packed.data(), absmax.data(), code.data(), n, bs, out.data());
  return tb::same_bits("qk_decode_4bit", out, c.load<float>("expected", n));
}

bool run_absmax_dq(const tb::Case& c) {
  const int64_t n = c.i("n"), bs2 = c.i("blocksize2");
  const auto q = c.load<uint8_t>("q", n);
  const auto a2 = c.load<float>("absmax2", (n + bs2 - 1) / bs2);
  const auto dmap = c.load<float>("dmap", 256);
  const float offset = c.load<float>("offset", 1)[0];
  std::vector<float> out(static_cast<size_t>(n));
  qk_host::absmax_dq(q.data(), a2.data(), dmap.data(), offset, n, bs2, out.data());
  return tb::same_bits("qk_absmax_dq", out, c.load<float>("expected", n));
}

// gemv (M == 1) and gemm (M > 1) both go through qk_host::linear_4bit; the case says
// which engine it is meant for, and the testbench checks that the shape selects it.
bool run_linear(const tb::Case& c, const char* engine) {
  const int64_t M = c.i("M"), K = c.i("K"), N = c.i("N"), bs = c.i("blocksize");
  const bool want_gemv = std::string(engine) == "qk_gemv_4bit";
  if (K % bs != 0 || (M == 1) != want_gemv) {
    std::printf("%s: FAIL the case's shape (M=%lld, K=%lld, blocksize=%lld) does not select this engine\n", engine,
                (long long)M, (long long)K, (long long)bs);
    return false;
  }
  const auto x = c.load<float>("x", M * K);
  const auto packed = c.load<uint8_t>("packed", (N * K + 1) / 2);
  const auto absmax = c.load<float>("absmax", (N * K + bs - 1) / bs);
  const auto code = c.load<float>("code", 16);
  std::vector<float> bias;
  if (c.exists("bias")) bias = c.load<float>("bias", N);
  std::vector<float> y(size_t(M * N));
  qk_host::linear_4bit(x.data(), M, K, packed.data(), absmax.data(), code.data(), N, bs,
                       bias.empty() ? nullptr : bias.data(), y.data());
  return tb::within(engine, y, c.load<float>("expected", M * N), c.load<float>("bound", M * N));
}

bool run_grad(const tb::Case& c) {
  const int64_t M = c.i("M"), K = c.i("K"), N = c.i("N"), bs = c.i("blocksize");
  if (K % bs != 0) {
    std::printf("qk_gemm_4bit_t: FAIL K %% blocksize != 0 selects the dense fallback\n");
    return false;
  }
  const auto dy = c.load<float>("dy", M * N);
  const auto packed = c.load<uint8_t>("packed", (N * K + 1) / 2);
  const auto absmax = c.load<float>("absmax", (N * K + bs - 1) / bs);
  const auto code = c.load<float>("code", 16);
  std::vector<float> dx(size_t(M * K));
  qk_host::linear_4bit_grad_input(dy.data(), M, N, packed.data(), absmax.data(), code.data(), K, bs, dx.data());
  return tb::within("qk_gemm_4bit_t", dx, c.load<float>("expected", M * K), c.load<float>("bound", M * K));
}

bool run_bf16(const tb::Case& c) {
  const int64_t K = c.i("K"), N = c.i("N");
  const auto w = c.load<uint16_t>("w", N * K);
  const auto x = c.load<float>("x", K);
  std::vector<float> y(static_cast<size_t>(N));
  qk_host::gemv_bf16(w.data(), N, K, x.data(), y.data());
  return tb::within("qk_gemv_4bit/bf16", y, c.load<float>("expected", N), c.load<float>("bound", N));
}

bool run_lora_down(const tb::Case& c) {
  const int64_t M = c.i("M"), K = c.i("K"), r = c.i("r");
  const auto x = c.load<float>("x", M * K);
  const auto a = c.load<float>("a", r * K);
  std::vector<float> u(size_t(M * r));
  qk_host::lora_down(x.data(), M, K, a.data(), r, u.data());
  return tb::within("qk_lora_down", u, c.load<float>("expected", M * r), c.load<float>("bound", M * r));
}

bool run_lora_up(const tb::Case& c) {
  const int64_t M = c.i("M"), N = c.i("N"), r = c.i("r");
  const auto u = c.load<float>("u", M * r);
  const auto b = c.load<float>("b", N * r);
  const auto y_in = c.load<float>("y_in", M * N);
  const float scaling = c.load<float>("scaling", 1)[0];
  std::vector<float> y(size_t(M * N));
  qk_host::lora_up(u.data(), M, r, b.data(), N, scaling, y_in.data(), y.data());
  return tb::within("qk_lora_up", y, c.load<float>("expected", M * N), c.load<float>("bound", M * N));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr,
                 "usage: %s decode|absmax_dq|gemv|gemm|gemm_t|gemv_bf16|lora_down|lora_up <case-dir>\n", argv[0]);
    return 2;
  }
  const std::string kernel = argv[1];
  try {
    const tb::Case c(argv[2]);
    bool ok;
    if (kernel == "decode") ok = run_decode(c);
    else if (kernel == "absmax_dq") ok = run_absmax_dq(c);
    else if (kernel == "gemv") ok = run_linear(c, "qk_gemv_4bit");
    else if (kernel == "gemm") ok = run_linear(c, "qk_gemm_4bit");
    else if (kernel == "gemm_t") ok = run_grad(c);
    else if (kernel == "gemv_bf16") ok = run_bf16(c);
    else if (kernel == "lora_down") ok = run_lora_down(c);
    else if (kernel == "lora_up") ok = run_lora_up(c);
    else {
      std::fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
      return 2;
    }
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("%s: FAIL %s\n", kernel.c_str(), e.what());
    return 1;
  }
}
