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
"$PY" - <<'EOF'
import ctypes
import os
import sys

mask = ctypes.CDLL(next(p for p in os.environ["LD_PRELOAD"].split(":") if p.endswith("cpuid_mask.so")))
mask.qk_cpuid_mask_count.restype = ctypes.c_long
os.environ["QLORA_KERNELS_BNB"] = "0"
import numpy as np
import torch
from bitsandbytes.cextension import lib
from onnx import TensorProto, helper

from qlora_kernels import _C

seen = (_C.best_isa(), torch.backends.cpu.get_cpu_capability(), bool(lib.has_avx512f_cpu()))
before = mask.qk_cpuid_mask_count()
import onnxruntime as ort  # noqa: E402 - its cpuid queries are counted from here
t = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in "abc"]
model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g", t[:2], t[2:]),
                          opset_imports=[helper.make_opsetid("", 17)])
x = np.ones((4, 4), np.float32)
ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": x, "b": x})
ort_asked = mask.qk_cpuid_mask_count() - before
print(f"masked_cpu: ours {seen[0]}, torch {seen[1]}, bitsandbytes AVX-512 {seen[2]}, "
      f"ONNX Runtime's cpuid answered by the mask {ort_asked}x")
if seen != ("avx2", "AVX2", False) or ort_asked == 0:
    sys.exit("masked_cpu: a library does not see the AVX2-only CPU; not running")
EOF
"$@"
