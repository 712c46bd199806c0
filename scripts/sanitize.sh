#!/usr/bin/env bash
# The sanitizer lane: builds the native extensions (qlora_kernels._C and ._hls) with
# AddressSanitizer and UndefinedBehaviorSanitizer into build-sanitize/ (the installed
# package is untouched) and runs the native-facing tests against that build. Every report
# aborts the process (-fno-sanitize-recover=all, halt_on_error), so any finding fails the run.
#
#   bash scripts/sanitize.sh                 # the CI subset, the CI example budget
#   FUZZ_EXAMPLES=2000 bash scripts/sanitize.sh tests/test_fuzz.py    # the long fuzzing run
#
# Needs the environment of scripts/setup.sh (.venv); docs/reliability.md describes the lane.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=build-sanitize

echo "sanitize: building the extensions with -fsanitize=address,undefined into $OUT/"
QLORA_KERNELS_SANITIZE=address,undefined "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp" \
  >"$OUT.build.log" 2>&1 || { cat "$OUT.build.log"; exit 1; }
rm -rf "$OUT/pkg" && mkdir -p "$OUT/pkg"
cp -r src/qlora_kernels "$OUT/pkg/"
cp -r kernels "$OUT/pkg/qlora_kernels/kernels"  # as the build ships them (setup.py)
find "$OUT/pkg" -name '*.so' -delete
cp "$OUT"/lib/qlora_kernels/*.so "$OUT/pkg/qlora_kernels/"

# Python and torch are not instrumented: the runtimes are preloaded, leak checking is off
# (the interpreter keeps memory until exit) and allocator mismatches inside uninstrumented
# libraries are not ours to report.
export PYTHONPATH="$PWD/$OUT/pkg${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:alloc_dealloc_mismatch=0:detect_odr_violation=0:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export QLORA_KERNELS_SANITIZED=1

"$PY" - <<'PYEOF'
import qlora_kernels._C as c, qlora_kernels._hls as h, pathlib
for m in (c, h):
    assert "build-sanitize" in m.__file__, f"{m.__name__} is not the sanitizer build: {m.__file__}"
    assert b"__asan_report" in pathlib.Path(m.__file__).read_bytes(), f"{m.__file__} is not instrumented"
print("sanitize: running against", c.__file__)
PYEOF

# Positive control: a caller that lies to a binding about a bias's length (the one thing the
# C++ side cannot check) must be caught, or this build would not catch anything.
if "$PY" - >"$OUT.control.log" 2>&1 <<'PYEOF'
import torch, qlora_kernels as qk
from qlora_kernels import _C, formats
packed, state = qk.quantize_4bit(torch.randn(64, 128))
x, y, b, code = torch.randn(1, 128), torch.empty(1, 64), torch.randn(3), formats.codebook("nf4")
_C.linear4_forward(x.data_ptr(), 1, 128, 128, packed.data_ptr(), packed.numel(), state.absmax.data_ptr(),
                   state.absmax.numel(), code.data_ptr(), 64, 64, b.data_ptr(), 64, y.data_ptr(), 64, 1)
PYEOF
then
  echo "sanitize: the positive control (a 3-float bias read as 64) was not reported"; exit 1
fi
grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" "$OUT.control.log" || { cat "$OUT.control.log"; exit 1; }
echo "sanitize: positive control reported as expected (heap-buffer-overflow)"

if [ "$#" -eq 0 ]; then
  set -- tests/test_reliability.py tests/test_bad_input.py tests/test_fuzz.py tests/test_linear.py \
    tests/test_linear_int8.py tests/test_loss.py tests/test_ops.py tests/test_optim_adamw.py tests/test_formats.py \
    tests/test_prepared.py tests/test_tuning.py tests/test_fused_layers.py tests/test_native_decode.py tests/test_attention.py \
    tests/test_lora.py tests/test_rope.py
fi
exec "$PY" -m pytest -p no:cacheprovider -q "$@"
