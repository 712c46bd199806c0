#!/usr/bin/env bash
# The "AVX2 pairing" on an AVX-512 machine: ours and the peers on their AVX2 code in one run,
# so an AVX2 comparison exists where no AVX2-only machine does.
# Where the CPU has cpuid faulting (Intel; AMD Zen 4 and later), the run goes through
# scripts/masked_cpu.sh: cpuid answers without AVX-512 in every process, and every library
# picks its AVX2 kernels itself, ONNX Runtime's MLAS included (it has no switch).
# Elsewhere (or with QLORA_KERNELS_PAIRING=switches), the peers that have a switch are held
# to AVX2 and MLAS runs its AVX-512 code:
#   ours: QLORA_KERNELS_ISA=avx2 (caps the extension); torch: ATEN_CPU_CAPABILITY=avx2;
#   MKL: MKL_ENABLE_INSTRUCTIONS=AVX2; oneDNN: ONEDNN_MAX_CPU_ISA=AVX2; bitsandbytes, which
#   has no switch: QLORA_KERNELS_BENCH_BNB_AVX2=1 (benches/bnb_isa.py sets its library's
#   CPU-feature answers as cpuid does on an AVX2-only CPU, and checks that its AVX2 kernels run).
# Usage: bash benches/avx2_pairing.sh [pytest args]   (default: the linear suite)
set -euo pipefail
cd "$(dirname "$0")/.."
# The working tree's package (built in place by scripts/setup.sh), not the copy installed in
# .venv, which is as old as the last `pip install .`: tables must time the code they sit beside.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-.venv/bin/python}
mkdir -p bench-results
[ "$#" -gt 0 ] || set -- benches/test_bench_linear.py --benchmark-json=bench-results/linear-avx2-pairing.json
if grep -qw cpuid_fault /proc/cpuinfo && [ "${QLORA_KERNELS_PAIRING:-mask}" != switches ]; then
  echo "avx2_pairing: every library on its AVX2 code by a masked cpuid (scripts/masked_cpu.sh)"
  exec bash scripts/masked_cpu.sh avx2 "$PY" -m pytest -q -p no:cacheprovider "$@"
fi
echo "avx2_pairing: ours, torch, MKL, oneDNN and bitsandbytes held to AVX2; ONNX Runtime on its own choice"
export QLORA_KERNELS_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  QLORA_KERNELS_BENCH_BNB_AVX2=1
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
