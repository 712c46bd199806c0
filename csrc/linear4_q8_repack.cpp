// The repacked weight layout of the one-row int8 kernel (linear4_q8.h): the byte
// permutation, and the dispatch of the kernel that reads it. Portable.
#include <cstring>
#include <stdexcept>

#include "dispatch.h"
#include "linear4_common.h"
#include "linear4_q8.h"

namespace qk {

bool linear4_q8_repack_shape_ok(int64_t K, int64_t blocksize) {
  // Blocks of whole rows; 16-byte blocks or larger keep a panel a whole number of vector
  // pairs (the kernel's unrolling).
  return blocksize >= 16 && blocksize % 16 == 0 && blocksize <= kQ8MaxBlocksize && K % blocksize == 0;
}

int64_t linear4_q8_repacked_bytes(int64_t N, int64_t K, int64_t blocksize) {
  const int64_t panels = ceil_div(K / blocksize, kQ8PanelBlocks);
  return N * panels * kQ8PanelBlocks * (blocksize / 2);
}

void linear4_q8_repack(const uint8_t* packed, int64_t N, int64_t K, int64_t blocksize, uint8_t* out, int nthreads) {
  const int64_t nb = K / blocksize, half = blocksize / 2, V = blocksize / 8;
  const int64_t panels = ceil_div(nb, kQ8PanelBlocks), row_out = panels * kQ8PanelBlocks * half;
#pragma omp parallel for num_threads(threads_for(ceil_div(N, 64), nthreads)) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = packed + n * (K / 2);
    uint8_t* o = out + n * row_out;
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t v = 0; v < V; ++v)
        for (int64_t j = 0; j < kQ8PanelBlocks; ++j, o += 4) {
          const int64_t b = p * kQ8PanelBlocks + j;
          if (b < nb)
            std::memcpy(o, row + b * half + 4 * v, 4);
          else
            std::memset(o, 0, 4);
        }
  }
}

namespace {
enum class RepackedPath { None, Avx2, Avx512Vnni };

RepackedPath repacked_path(int64_t N, int64_t K, int64_t blocksize) {
#if defined(QK_X86)
  if (!linear4_q8_repack_shape_ok(K, blocksize)) return RepackedPath::None;
  // Both repacked kernels stream and multiply the padding of a row's last panel too (16x the
  // work at one block a row, 1.8x at 9 blocks), where the chunked kernels read the row
  // alone: a repacked kernel runs where that padding is at most a quarter of the row, or
  // (AVX2) where the chunked kernel does not take the shape. One row, AVX-512 VNNI, 2
  // threads, repacked / chunked: 0.75x with no padding (4096x4096, blocks of 64), 1.06x at
  // 24 -> 32 blocks, 1.39x at 8 -> 16, 60x at 1 -> 16 (blocks of 4096; docs/benchmarks.md).
  const int64_t nb = blocksize > 0 ? K / blocksize : 0, padded = ceil_div(nb, kQ8PanelBlocks) * kQ8PanelBlocks;
  const bool little_padding = 4 * padded <= 5 * nb;
  // The VNNI kernel quantizes x with the chunked VNNI kernel's prepare_row: that shape must
  // fit too, and the chunked VNNI kernel then takes the padded shapes.
  const Weight4Q8 w{nullptr, nullptr, nullptr, N, K, blocksize};
  if (current_isa() == Isa::Avx512Vnni && linear4_q8_avx512vnni_fits(w))
    return little_padding ? RepackedPath::Avx512Vnni : RepackedPath::None;
  // The AVX2 kernel quantizes x with the portable quantizer: any shape of the layout.
  if (current_isa() != Isa::Scalar && (little_padding || !linear4_q8_avx2_fits(w))) return RepackedPath::Avx2;
#else
  (void)N, (void)K, (void)blocksize;
#endif
  return RepackedPath::None;
}
}  // namespace

bool linear4_q8_repacked_fits(int64_t N, int64_t K, int64_t blocksize) {
  return repacked_path(N, K, blocksize) != RepackedPath::None;
}

const char* linear4_q8_repacked_plan(int64_t N, int64_t K, int64_t blocksize) {
  switch (repacked_path(N, K, blocksize)) {
    case RepackedPath::Avx512Vnni: return "avx512-vnni-repacked";
    case RepackedPath::Avx2: return "avx2-repacked";
    default: return "";
  }
}

void linear4_q8_forward_repacked(const float* x, int64_t M, int64_t ldx, const uint8_t* repacked, const Weight4Q8& w,
                                 const float* bias, float* y, int64_t ldy, int nthreads) {
  // Callers check linear4_q8_repacked_fits first (the bindings refuse the call otherwise).
  switch (repacked_path(w.N, w.K, w.blocksize)) {
#if defined(QK_X86)
    case RepackedPath::Avx512Vnni:
      return linear4_q8_forward_repacked_avx512vnni(x, M, ldx, repacked, w, bias, y, ldy, nthreads);
    case RepackedPath::Avx2: return linear4_q8_forward_repacked_avx2(x, M, ldx, repacked, w, bias, y, ldy, nthreads);
#endif
    default:
      (void)x, (void)M, (void)ldx, (void)repacked, (void)bias, (void)y, (void)ldy, (void)nthreads;
      throw std::logic_error("linear4_q8_forward_repacked: no repacked int8 kernel on this ISA");
  }
}

}  // namespace qk
