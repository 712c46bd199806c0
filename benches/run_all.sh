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
for suite in ${SUITES:-quant linear train opencl optim onnx}; do
  f="benches/test_bench_${suite}.py"
  [ -f "$f" ] || continue
  cmd="$PY -m pytest $f --benchmark-json=bench-results/${suite}.json -q -p no:cacheprovider"
  echo "== $cmd"
  $cmd
done
for suite in quant linear train opencl optim onnx; do
  [ -f "bench-results/${suite}.json" ] || continue
  "$PY" benches/report.py "bench-results/${suite}.json" --title "$suite" \
    --command "$PY -m pytest benches/test_bench_${suite}.py --benchmark-json=bench-results/${suite}.json" >> "$out.tmp"
done
# Peak memory is a per-process high-water mark: its own script, one process per row.
if [ "${MEMORY:-1}" = 1 ]; then
  {
    echo
    echo "## peak memory of a training step"
    echo
    echo "- machine: as above; each configuration in its own process, peak RSS after 2 AdamW steps,"
    echo "  random Phi-3 (hidden 1024, intermediate 2816, 4 layers, vocab 32064), LoRA r=16 on every"
    echo "  projection, batch 2 x 256. The fp32 model is built first in every process (the same for"
    echo "  all rows). ours = NF4 + the fused head + loss; ours-unfused = NF4 + transformers' loss."
    echo "- command: \`$PY benches/train_memory.py --model phi3 --steps 2\`"
    echo
    "$PY" benches/train_memory.py --model phi3 --steps 2
  } >> "$out.tmp"
fi
# The per-rank memory table of the distributed engines (benches/dist_memory.py spawns
# 7 training processes; rerun it by hand and paste its output into that file).
{ echo; cat docs/benchmarks_dist_memory.md; } >> "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out"
