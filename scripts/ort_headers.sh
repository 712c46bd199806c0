#!/usr/bin/env bash
# Fetches ONNX Runtime's C API headers, which the custom operator library (csrc/ort,
# qlora_kernels._ort_ops) is compiled against, into build/onnxruntime-headers (or $1).
# No PyPI wheel of onnxruntime ships them and no sdist is on PyPI; Debian ships them in
# libonnxruntime-dev from Debian 13 (trixie) on. Only the .deb is downloaded and unpacked
# (no package is installed, nothing of the system's apt setup is changed): apt reads a
# private sources list and verifies the download against Debian's archive key.
# The library needs API version 21 (ONNX Runtime 1.21) or newer headers; ONNX Runtime
# serves every older API version, so it loads into any newer runtime.
#   bash scripts/ort_headers.sh [DEST]     # prints DEST's absolute path on success
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-build/onnxruntime-headers}
SUITE=${QLORA_KERNELS_ORT_SUITE:-trixie}
MIRROR=${QLORA_KERNELS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

if [ -f "$DEST/onnxruntime_c_api.h" ]; then
  (cd "$DEST" && pwd)
  exit 0
fi
command -v apt-get >/dev/null || { echo "ort_headers: needs apt-get (Debian or Ubuntu)" >&2; exit 1; }
[ -f "$KEYRING" ] || { echo "ort_headers: $KEYRING missing (Debian's debian-archive-keyring)" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/deb"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" > "$WORK/sources.list"
APT=(-o "Dir::Etc::SourceList=$WORK/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/cache" -o Debug::NoLocking=1
     -o APT::Sandbox::User=root)
apt-get "${APT[@]}" -qq update >&2
(cd "$WORK/deb" && apt-get "${APT[@]}" -qq download libonnxruntime-dev >&2)
dpkg-deb -x "$WORK"/deb/libonnxruntime-dev_*.deb "$WORK/root"
SRC="$WORK/root/usr/include/onnxruntime"
VERSION=$(sed -n 's/^#define ORT_API_VERSION \([0-9]*\).*/\1/p' "$SRC/onnxruntime_c_api.h")
if [ -z "$VERSION" ] || [ "$VERSION" -lt 21 ]; then
  echo "ort_headers: $SUITE's libonnxruntime-dev has API version '${VERSION}', the library needs >= 21" >&2
  exit 1
fi
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.tmp" && cp -r "$SRC" "$DEST.tmp"
cp "$WORK/root/usr/share/doc/libonnxruntime-dev/copyright" "$DEST.tmp/"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "ort_headers: ONNX Runtime C API version $VERSION headers in $DEST" >&2
(cd "$DEST" && pwd)
