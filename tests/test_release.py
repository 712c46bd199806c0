"""What the release wheel promises of the built extensions (docs/release.md): one OpenMP
runtime in a process that imports torch and then qlora_kernels (torch's: the wheel does not
bundle libgomp), and symbol versions no newer than manylinux_2_28 allows (setup.py's
manylinux_floor; scripts/release_check.sh checks the repaired wheel's tag on top)."""
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

from qlora_kernels import _C, _hls

LINUX = sys.platform.startswith("linux")

# A 4-bit linear forward big enough for the kernels' OpenMP team (2 threads), then the
# OpenMP runtimes mapped into the process: right after `import torch`, and after our kernel.
_ONE_RUNTIME = r"""
import json, re, torch
def runtimes():
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/" in line}
    return sorted(p for p in paths if re.search(r"/lib(gomp|omp|iomp5?)[^/]*\.so", p))
after_torch = runtimes()
import qlora_kernels as qk
torch.set_num_threads(2)
torch.manual_seed(0)
W, x = torch.randn(256, 512), torch.randn(64, 512)
packed, state = qk.quantize_4bit(W)
with qk.use_backend("cpu"):
    y = qk.linear_4bit(x, packed, state)
torch.testing.assert_close(y, x @ qk.dequantize_4bit(packed, state).T, rtol=1e-4, atol=1e-4)
with open("/proc/self/maps") as f:
    ours = qk._C.__file__ in f.read()
print(json.dumps({"after_torch": after_torch, "after_ours": runtimes(), "ours_mapped": ours}))
"""


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps (Linux)")
def test_torch_then_qlora_kernels_maps_exactly_one_openmp_runtime():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", _ONE_RUNTIME], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["ours_mapped"]
    assert len(seen["after_ours"]) == 1, f"OpenMP runtimes in one process: {seen['after_ours']}"
    assert seen["after_ours"] == seen["after_torch"], "the extension loaded an OpenMP runtime torch had not"


# The newest symbol version of each library that auditwheel's manylinux_2_28 policy allows on
# x86-64 (auditwheel/policy/manylinux-policy.json: glibc 2.28, GCC 8's libstdc++ and libgcc_s).
MANYLINUX_2_28 = {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)}


def _dynamic_symbols(path):
    """(name, version or "", defined) for each entry of the module's dynamic symbol table."""
    out = subprocess.run(["readelf", "--dyn-syms", "--wide", path], capture_output=True, text=True, check=True).stdout
    syms = []
    for line in out.splitlines():
        f = line.split()
        if len(f) < 8 or not f[0].endswith(":"):
            continue
        name, _, version = f[7].partition("@")
        syms.append((name, version.lstrip("@"), f[6] != "UND"))
    return syms


@pytest.mark.skipif(not LINUX or platform.libc_ver()[0] != "glibc" or platform.machine() != "x86_64",
                    reason="the manylinux floor is set for glibc x86-64 builds (setup.py manylinux_floor)")
@pytest.mark.skipif(os.environ.get("QLORA_KERNELS_SANITIZED") == "1",
                    reason="the sanitizer build links the shared libstdc++ by design (setup.py)")
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils) to read the modules")
@pytest.mark.parametrize("module", ["_C", "_hls", "_ort_ops"])
def test_the_extension_needs_nothing_newer_than_manylinux_2_28(module):
    from qlora_kernels.integrations.onnx import ortops

    # _ort_ops is no Python module (ONNX Runtime loads it): it is found by its file
    path = {"_C": _C.__file__, "_hls": _hls.__file__, "_ort_ops": ortops.library_path()}[module]
    assert path is not None, "the ONNX Runtime operator library was not built (scripts/ort_headers.sh)"
    syms = _dynamic_symbols(path)
    assert any(v.startswith("GLIBC_") for _, v, _ in syms), "no versioned glibc symbol: readelf output changed?"
    too_new = []
    for name, version, defined in syms:
        m = re.fullmatch(r"(GLIBC|GLIBCXX|CXXABI|GCC)_([0-9.]+)", version)
        if not defined and m and tuple(map(int, m[2].split("."))) > MANYLINUX_2_28[m[1]]:
            too_new.append(f"{name}@{version}")
    assert too_new == [], f"symbols newer than manylinux_2_28 allows: {too_new}"
    # The libstdc++ linked into the module stays private: it neither interposes nor gets
    # interposed by the libstdc++ torch loads (-Wl,--exclude-libs,ALL).
    exported = [n for n, _, defined in syms if defined and n.startswith(("_Znw", "_Zdl", "__cxa_", "__gxx_"))]
    assert exported == [], f"libstdc++ runtime symbols exported: {exported}"
