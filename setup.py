"""Builds qlora_kernels._C. Each ISA path lives in its own source file and gets its own
compiler flags (``*_avx2.cpp`` -> -mavx2 -mfma -mf16c); the rest is built for the baseline
ISA and picks a path at run time from cpuid. Never -march=native: wheels must run on any
x86-64 CPU."""
import os
import platform
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

# GCC 12's own AVX-512 intrinsics headers trip -Wuninitialized / -Wmaybe-uninitialized
# (`__Y = __Y` in _mm512_undefined_*; GCC PR 105593): ~370 warnings per build, none ours.
# They are silenced on the AVX-512 files only; the same code paths' logic is checked by the
# scalar and AVX2 builds and the sanitizer lane.
_AVX512_QUIET = ["-Wno-uninitialized", "-Wno-maybe-uninitialized"]
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512vnni.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512vbmi",
                        "-mfma", "-mf16c"] + _AVX512_QUIET,
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"] + _AVX512_QUIET,
}

sources = sorted(
    os.path.join("csrc", f)
    for f in os.listdir("csrc")
    if f.endswith(".cpp") and (IS_X86 or not any(f.endswith(s) for s in ISA_FLAGS))
)


class BuildExt(build_ext):
    """Adds per-file ISA flags by wrapping the compiler's single-file compile step."""

    def build_extensions(self):
        original = self.compiler._compile

        def compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = list(extra_postargs)
            for suffix, flags in ISA_FLAGS.items():
                if src.endswith(suffix):
                    extra += flags
            return original(obj, src, ext, cc_args, extra, pp_opts)

        self.compiler._compile = compile_one
        super().build_extensions()


openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
# QLORA_KERNELS_SANITIZE=address,undefined builds the sanitizer lane's extension
# (scripts/sanitize.sh): every report aborts, so a test that triggers one fails.
SANITIZE = os.environ.get("QLORA_KERNELS_SANITIZE", "")
san_flags = [f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"] if SANITIZE else []
ext = Pybind11Extension(
    "qlora_kernels._C",
    sources,
    cxx_std=17,
    define_macros=[("QK_X86", "1")] if IS_X86 else [],
    # -ffp-contract=off: a fused multiply-add would change rounding against the
    # reference; no -ffast-math: the kernels rely on IEEE subnormals and NaN compares.
    extra_compile_args=["-O1" if SANITIZE else "-O3", "-ffp-contract=off", "-fno-math-errno"] + openmp + san_flags,
    extra_link_args=openmp + san_flags,
)

# qlora_kernels._hls: the HLS kernels (hls/*.cpp) C-simulated under plain g++, with the
# host call sequences (hls/host) and their bindings: the `hls` backend. No ISA flags (the
# per-file wrapper above leaves these sources alone); -ffp-contract=off keeps every fp32
# operation the kernels spell out a separate rounding, as on the FPGA.
hls_sources = sorted(
    os.path.join(d, f)
    for d in ("hls", os.path.join("hls", "host"))
    for f in os.listdir(d)
    if f.endswith(".cpp")
) + [os.path.join("hls", "bindings", "qk_hls_bindings.cpp")]
hls_ext = Pybind11Extension(
    "qlora_kernels._hls",
    hls_sources,
    include_dirs=["hls"],
    cxx_std=17,
    extra_compile_args=["-O2", "-ffp-contract=off", "-fno-math-errno", "-Wno-unknown-pragmas", "-Wno-unused-label"]
    + san_flags,
    extra_link_args=san_flags,
)

# kernels/*.cl (one top-level folder, as in the repository's layout) ships inside the
# package as the data-only package qlora_kernels.kernels, where qlora_kernels.opencl reads it.
setup(
    packages=find_packages("src") + ["qlora_kernels.kernels"],
    py_modules=["_qlora_kernels_bnb"],  # the bitsandbytes.backends entry point (pyproject.toml)
    package_dir={"": "src", "qlora_kernels.kernels": "kernels"},
    # fpga: what scripts/rtl_synth.py measured from hls/rtl, read by the FPGA model (fpga/measured.py)
    package_data={"qlora_kernels.kernels": ["*.cl"], "qlora_kernels.fpga": ["rtl_measured.json"]},
    ext_modules=[ext, hls_ext],
    cmdclass={"build_ext": BuildExt},
)
