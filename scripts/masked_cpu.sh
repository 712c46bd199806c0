#!/usr/bin/env bash
# Runs a command on this AVX-512 machine as on an AVX2-only CPU, at native speed: cpuid, in
# every process of the command's tree, answers without the AVX-512 family (scripts/cpuid_mask.c,
# Linux cpuid faulting). Every library then picks the kernels it runs on an AVX2-only CPU by
# its own cpuid query, nothing forced: our extension (avx2 path), torch (ATen capability AVX2,
# cpuinfo), MKL, oneDNN, OpenBLAS, bitsandbytes' native library, ONNX Runtime's MLAS (which
# has no switch of its own), and g++ -march=native (torch inductor). glibc picks its string
# functions before any preload runs, so it is told by its tunables instead.
#   bash scripts/masked_cpu.sh avx2 <command> [args...]
#   e.g. bash scripts/masked_cpu.sh avx2 .venv/bin/python -m pytest benches/test_bench_linear.py
# For speed (issue 15: peers' AVX2 code, ONNX Runtime's included, beside ours on the same
# cores). It is not an AVX2-only CPU: the cores, caches and clocks are this machine's, and an
# AVX-512 instruction executed without asking cpuid still runs; scripts/emulated_cpu.sh
# (QEMU) is the check for that. Needs the cpuid_fault CPU flag (Intel, AMD Zen 4 and later,
# and their VMs); exits 3 without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != avx2 ] || [ "$#" -lt 2 ]; then
  echo "usage: bash scripts/masked_cpu.sh avx2 <command> [args...]" >&2; exit 2
fi
shift
if ! grep -qw cpuid_fault /proc/cpuinfo; then
  echo "masked_cpu: this CPU or kernel has no cpuid faulting (no cpuid_fault in /proc/cpuinfo)" >&2; exit 3
fi
PY=${PY:-.venv/bin/python}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
case ":${LD_PRELOAD:-}" in
  *cpuid_mask.so:* | *cpuid_mask.so) ;;  # a masked command runs this again (a test): one mask
  *)
    gcc -O2 -Wall -Wextra -shared -fPIC -o "$scratch/cpuid_mask.so" scripts/cpuid_mask.c -ldl
    export LD_PRELOAD="$scratch/cpuid_mask.so${LD_PRELOAD:+:$LD_PRELOAD}" ;;
esac
# torch inductor keys its caches on the host, not on the vector ISA it picks from cpuid: with
# the cache that native (AVX-512) runs had filled, tests/test_linear_ops.py's torch.compile
# test computed garbage under the mask (1e33 for values near 1); with an empty one it passes.
export TORCHINDUCTOR_CACHE_DIR="$scratch/inductor"
# Last, because glibc takes the last hwcaps entry.
case "${GLIBC_TUNABLES:-}" in
  *hwcaps=-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL) ;;
  *) hwcaps="glibc.cpu.hwcaps=-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL"
     export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}$hwcaps" ;;
esac
# The run proves nothing unless the libraries see an AVX2-only CPU: check that first (ours,
# torch, bitsandbytes, and that ONNX Runtime asked cpuid and was answered by the mask).
"$PY" scripts/cpu_view.py masked_cpu avx2 AVX2 --mask
"$@"
