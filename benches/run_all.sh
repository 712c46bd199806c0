#!/usr/bin/env bash
# Runs every benchmark suite (2 threads) and rewrites this machine class's section of
# docs/benchmarks.md (AVX2-only or AVX-512, from the CPU path cpuid selects); the other
# class's section is kept as it is, since no machine has both.
# Usage: bash benches/run_all.sh [python]   (default: .venv/bin/python if present)
#        SUITES="linear train" bash benches/run_all.sh    (a subset; the others' tables are dropped)
set -euo pipefail
cd "$(dirname "$0")/.."
# The working tree's package (built in place by scripts/setup.sh), not the copy installed in
# .venv, which is as old as the last `pip install .`: tables must time the code they sit beside.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
mkdir -p bench-results
cls=$("$PY" -c "import qlora_kernels._C as c; print('avx512' if c.best_isa().startswith('avx512') else 'avx2')")
section=$(mktemp)
{
  if [ "$cls" = avx512 ]; then echo "## AVX-512 machine"; else echo "## AVX2-only machine"; fi
  echo
  echo "- this machine's limits, measured (\`qlora-kernels info --peak\`, 2 threads):"
  echo
  echo '```'
  "$PY" -c "from qlora_kernels import peak; print(peak.measure(2).table())"
  echo '```'
  echo
} > "$section"
for suite in ${SUITES:-quant linear train opencl optim onnx}; do
  f="benches/test_bench_${suite}.py"
  [ -f "$f" ] || continue
  cmd="$PY -m pytest $f --benchmark-json=bench-results/${suite}-${cls}.json -q -p no:cacheprovider"
  echo "== $cmd"
  $cmd
  "$PY" benches/report.py "bench-results/${suite}-${cls}.json" --title "$suite ($cls)" --level 3 \
    --command "$cmd" >> "$section"
done
# Peak memory is a per-process high-water mark: its own script, one process per row.
if [ "${MEMORY:-1}" = 1 ]; then
  {
    echo
    echo "### peak memory of a training step ($cls)"
    echo
    echo "- each configuration in its own process, peak RSS after 2 AdamW steps,"
    echo "  random Phi-3 (hidden 1024, intermediate 2816, 4 layers, vocab 32064), LoRA r=16 on every"
    echo "  projection, batch 2 x 256. The fp32 model is built first in every process (the same for"
    echo "  all rows). ours = NF4 + the fused head + loss, RMSNorm and SwiGLU; ours-no-norm-mlp = NF4 +"
    echo "  the fused head + loss only; ours-unfused = NF4 + transformers' loss, norm and MLP."
    echo "- command: \`$PY benches/train_memory.py --model phi3 --steps 2\`"
    echo
    "$PY" benches/train_memory.py --model phi3 --steps 2
  } >> "$section"
fi
"$PY" benches/report.py --replace-section "$cls" "$section" docs/benchmarks.md
echo "rewrote the $cls section of docs/benchmarks.md"
