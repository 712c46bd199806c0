#!/usr/bin/env bash
# pytest on an emulated CPU class: QEMU user mode emulates the instruction set and cpuid, so
# the suite can be shown to hold on CPUs the machine at hand is not (issue 15).
#   bash scripts/emulated_cpu.sh avx2   [pytest args]   # AMD EPYC-Rome (Zen 2): AVX2/FMA, no AVX-512
#   bash scripts/emulated_cpu.sh noavx2 [pytest args]   # Intel IvyBridge: AVX, F16C, no AVX2/FMA
# Everything in the process sees that CPU: our path selection (cpuid, nothing forced), torch's
# ATen capability, bitsandbytes' native library (its AVX-512/AVX2 choice is its own cpuid
# query), PoCL's LLVM target; an instruction the model lacks is SIGILL, a crash of the run.
# Correctness only: speed under emulation means nothing. bitsandbytes' native library dies of
# SIGILL on both CPUs without AVX2 tried (SandyBridge, IvyBridge; docs/formats.md): the noavx2
# lane runs only tests that do not call it.
#
# QEMU user mode does not emulate /proc/cpuinfo, and a process it starts runs natively:
#   * the interpreter is a shim venv whose `python` runs the project's .venv python under QEMU
#     (qemu -0 keeps the shim as argv[0], so sys.executable is the shim): the fresh Pythons
#     that tests start (the CLI, resumed fine-tuning runs, torchrun workers) are emulated too;
#     other programs (g++, the HLS testbenches) run natively;
#   * torch inductor reads /proc/cpuinfo for its vector ISA and compiles with the native g++ at
#     -march=native, then loads that code into the emulated process: its ISA and -march are
#     pinned to the model's, and its cache starts empty (a natively built kernel would be reused);
#   * our tuning cache is keyed on /proc/cpuinfo and a calibration would time emulated code:
#     tuning off (built-in values), cache in a scratch folder.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  avx2)   model=EPYC-Rome;   aten=avx2;    march=x86-64-v3; ours=avx2;   torch_cap=AVX2 ;;
  noavx2) model=IvyBridge;   aten=default; march=x86-64;    ours=scalar; torch_cap=DEFAULT ;;
  *) echo "usage: bash scripts/emulated_cpu.sh avx2|noavx2 [pytest args]" >&2; exit 2 ;;
esac
shift
if ! command -v qemu-x86_64 >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "emulated_cpu: qemu-x86_64 is missing and this user cannot apt-get install qemu-user" >&2; exit 1
  fi
  echo "emulated_cpu: installing qemu-user with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# QEMU's TCG lacks some of the model's system features (x2apic, xsaves, ...) and warns about
# each on stderr of every process, which tests that read a child's stderr would see: the
# model is asked for without them (TCG would not provide them anyway; the AVX2/FMA/AVX-512
# bits the lanes are about stay as the model has them, and the check below sees to it).
missing=$(qemu-x86_64 -cpu "$model" /bin/true 2>&1 |
  sed -n "s/.*TCG doesn't support requested feature: CPUID[^.]*\.[^.]*\.\([^ ]*\) .*/\1=off/p" | sort -u | paste -sd, -)
cpu="$model${missing:+,$missing}"
mkdir -p "$scratch/venv/bin"
cp .venv/pyvenv.cfg "$scratch/venv/"
ln -s "$PWD/.venv/lib" "$scratch/venv/lib"
printf '#!/bin/sh\nexec qemu-x86_64 -cpu %s -0 "$0" "%s" "$@"\n' "$cpu" "$PWD/.venv/bin/python" > "$scratch/venv/bin/python"
chmod +x "$scratch/venv/bin/python"
echo "emulated_cpu: $(qemu-x86_64 --version | head -1), -cpu $cpu"
# The lane proves nothing unless every library sees the emulated CPU: check that first.
"$scratch/venv/bin/python" scripts/cpu_view.py emulated_cpu "$ours" "$torch_cap"
ATEN_CPU_CAPABILITY=$aten TORCHINDUCTOR_CPP_MARCH=$march TORCHINDUCTOR_CACHE_DIR="$scratch/inductor" \
  QLORA_KERNELS_TUNE=0 QLORA_KERNELS_CACHE="$scratch/cache" \
  "$scratch/venv/bin/python" -m pytest -p no:cacheprovider "$@"
