#!/usr/bin/env bash
# The "AVX2 pairing" on an AVX-512 machine: ours and the peers that have a switch for it
# held to AVX2 in one run, so an AVX2 comparison exists where no AVX2-only machine does.
#   ours: QLORA_KERNELS_ISA=avx2 (caps the extension); torch: ATEN_CPU_CAPABILITY=avx2;
#   MKL: MKL_ENABLE_INSTRUCTIONS=AVX2; oneDNN: ONEDNN_MAX_CPU_ISA=AVX2; bitsandbytes, which
#   has no switch: QLORA_KERNELS_BENCH_BNB_AVX2=1 (benches/bnb_isa.py sets its library's
#   CPU-feature answers as cpuid does on an AVX2-only CPU, and checks that its AVX2 kernels run).
# ONNX Runtime's MLAS has no such switch: its rows in this run are still its AVX-512 code,
# and the tables say so; its AVX2 numbers come only from an AVX2-only machine (the AVX2-only
# section of docs/benchmarks.md).
# Usage: bash benches/avx2_pairing.sh [pytest args]   (default: the linear suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export QLORA_KERNELS_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  QLORA_KERNELS_BENCH_BNB_AVX2=1
mkdir -p bench-results
[ "$#" -gt 0 ] || set -- benches/test_bench_linear.py --benchmark-json=bench-results/linear-avx2-pairing.json
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
