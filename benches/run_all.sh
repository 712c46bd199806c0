#!/usr/bin/env bash
# Runs every benchmark suite (2 threads) and rewrites docs/benchmarks.md from the results.
# Usage: bash benches/run_all.sh [python]   (default: .venv/bin/python if present)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
mkdir -p bench-results
out=docs/benchmarks.md
{
  echo "# Benchmarks"
  echo
  echo "Every table: our kernel and its peers on the same inputs in the same process, 2 threads,"
  echo "medians (pytest-benchmark). \"our speedup vs it\" = peer median / our best median, so > 1"
  echo "means we are faster. The machines are shared and noisy: read ratios, not absolute times."
  echo
} > "$out.tmp"
for suite in ${SUITES:-quant linear train opencl onnx}; do
  f="benches/test_bench_${suite}.py"
  [ -f "$f" ] || continue
  cmd="$PY -m pytest $f --benchmark-json=bench-results/${suite}.json -q -p no:cacheprovider"
  echo "== $cmd"
  $cmd
done
for suite in quant linear train opencl onnx; do
  [ -f "bench-results/${suite}.json" ] || continue
  "$PY" benches/report.py "bench-results/${suite}.json" --title "$suite" \
    --command "$PY -m pytest benches/test_bench_${suite}.py --benchmark-json=bench-results/${suite}.json" >> "$out.tmp"
done
mv "$out.tmp" "$out"
echo "wrote $out"
