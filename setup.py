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

# The scalar path is built without GCC's loop vectorizer: GCC 12.2 at -O3 vectorized the
# scalar block product of attention_simd.h (cols_by_rows_acc on one-lane tiles) into code
# that reads one row past its input, a fault when that input ends at a page boundary
# (tests/test_guard_pages.py caught it; the sanitizer lane's -O1 build does not vectorize).
# The scalar path is the correctness fallback for CPUs without AVX2, not a speed path.
FILE_FLAGS = {**ISA_FLAGS, "_scalar.cpp": ["-fno-tree-loop-vectorize"]}

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
            for suffix, flags in FILE_FLAGS.items():
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


def manylinux_floor(module):
    """Compile and link flags that hold a glibc build to manylinux_2_28 (torch's CPU wheels'
    tag) whatever the build machine's GCC and glibc (docs/release.md, "The glibc floor"; GCC
    12 and glibc 2.36 gave manylinux_2_34). Every build but the sanitizer lane's uses them,
    so the tests run what the wheel ships; tests/test_release.py checks the symbol versions."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or SANITIZE:
        return [], [], []  # the sanitizer runtimes expect the shared libstdc++
    # exp/log/pow bound to their pre-2.29 versions, __libc_single_threaded (2.32) defined privately
    compile_args = ["-include", os.path.join("csrc", "manylinux_floor.h")]
    link_args = [
        # libstdc++'s newer symbols (GLIBCXX_3.4.29, CXXABI_1.3.13, which GCC 12's headers
        # call) are linked into the module instead of needed from the system's libstdc++...
        "-static-libstdc++",
        # ...and kept private: not exported, so they neither interpose nor get interposed by
        # the libstdc++ torch loads. No C++ object or exception crosses the module boundary
        # (the bindings take integers and data pointers; pybind11 turns exceptions into
        # Python errors inside the module), and PYBIND11_STDLIB below keeps other pybind11
        # modules' code out of ours. libgcc stays shared (libgcc_s: GCC_3.0-4.2 symbols,
        # all allowed): one unwinder in the process, and GCC 12's static libgcc_eh would need
        # glibc 2.35's _dl_find_object.
        "-Wl,--exclude-libs,ALL",
        # Unused archive code is dropped, e.g. std::random_device (linked along with the
        # strings of libstdc++'s exception classes), whose arc4random needs glibc 2.36.
        "-Wl,--gc-sections",
    ]
    # pybind11 shares its internals (type tables, exception translators) between modules of
    # the same ABI id; a private id per module means no other module's pybind11 code -- built
    # against another copy of libstdc++, torch's included -- ever handles our types or exceptions.
    macros = [("PYBIND11_STDLIB", f'"_static_libstdcpp_qlora_kernels_{module}"')]
    return compile_args, link_args, macros


floor_cflags, floor_ldflags, floor_macros = manylinux_floor("C")
ext = Pybind11Extension(
    "qlora_kernels._C",
    sources,
    cxx_std=17,
    define_macros=([("QK_X86", "1")] if IS_X86 else []) + floor_macros,
    # -ffp-contract=off: a fused multiply-add would change rounding against the
    # reference; no -ffast-math: the kernels rely on IEEE subnormals and NaN compares.
    extra_compile_args=["-O1" if SANITIZE else "-O3", "-ffp-contract=off", "-fno-math-errno"] + openmp + san_flags
    + floor_cflags,
    extra_link_args=openmp + san_flags + floor_ldflags,
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
hls_cflags, hls_ldflags, hls_macros = manylinux_floor("hls")
hls_ext = Pybind11Extension(
    "qlora_kernels._hls",
    hls_sources,
    include_dirs=["hls"],
    define_macros=hls_macros,
    cxx_std=17,
    extra_compile_args=["-O2", "-ffp-contract=off", "-fno-math-errno", "-Wno-unknown-pragmas", "-Wno-unused-label"]
    + san_flags + hls_cflags,
    extra_link_args=san_flags + hls_ldflags,
)

# qlora_kernels._ort_ops: the ONNX Runtime custom operator library (csrc/ort; docs/onnx.md,
# "The operator library"). A plain shared library that ONNX Runtime dlopens, not a
# Python module (the extension machinery only builds and places it). It needs ONNX
# Runtime's C API headers, which no PyPI wheel ships: scripts/ort_headers.sh fetches them
# (Debian's libonnxruntime-dev) and QLORA_KERNELS_ORT_INCLUDE points here; without them
# the library is left out and exports fall back to ONNX Runtime's own MatMulBnb4.
# No OpenMP: the operator runs on ONNX Runtime's own threads, and the kernels' sources are
# compiled again without -fopenmp, through one-line wrappers in the build folder (the same
# source compiled for two extensions would otherwise share one object file).
ORT_SHARED = ["linear4_scalar", "linear4_avx2", "linear4_avx512", "linear4_scratch", "linear4_q8_scalar",
              "linear4_q8_avx2", "linear4_q8_avx512vnni", "linear4_q8_repack", "dense_scalar", "dense_avx2",
              "dense_avx512", "dispatch", "tuning", "quant4_scalar", "quant4_avx2", "quant4_avx512"]
ORT_INCLUDE = os.environ.get("QLORA_KERNELS_ORT_INCLUDE", os.path.join("build", "onnxruntime-headers"))
ext_modules = [ext, hls_ext]
if os.path.isfile(os.path.join(ORT_INCLUDE, "onnxruntime_c_api.h")) and not SANITIZE:
    wrap_dir = os.path.join("build", "ort_ops_src")
    os.makedirs(wrap_dir, exist_ok=True)
    ort_sources = sorted(os.path.join("csrc", "ort", f) for f in os.listdir(os.path.join("csrc", "ort"))
                         if f.endswith(".cpp"))
    for name in ORT_SHARED:
        if not IS_X86 and any((name + ".cpp").endswith(s) for s in ISA_FLAGS):
            continue
        wrapper = os.path.join(wrap_dir, name + ".cpp")
        text = f'#include "../../csrc/{name}.cpp"\n'
        if not os.path.isfile(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        ort_sources.append(wrapper)
    ort_cflags, ort_ldflags, _ = manylinux_floor("ort_ops")
    ext_modules.append(Pybind11Extension(
        "qlora_kernels._ort_ops",
        ort_sources,
        include_dirs=[os.path.abspath(ORT_INCLUDE), "csrc"],
        define_macros=[("QK_X86", "1")] if IS_X86 else [],
        cxx_std=17,
        # exports.map: only RegisterCustomOps and the two ISA hooks are exported, so the
        # kernels' qk:: symbols never bind to the Python extension's copies in the process
        extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-Wno-unknown-pragmas"] + ort_cflags,
        # --no-undefined: a kernel source missing from ORT_SHARED fails the link, not the dlopen
        extra_link_args=ort_ldflags + ["-Wl,--version-script=" + os.path.join("csrc", "ort", "exports.map"),
                                       "-Wl,--no-undefined"],
    ))
elif "QLORA_KERNELS_ORT_INCLUDE" in os.environ and not SANITIZE:  # the sanitizer build skips it
    raise SystemExit(f"QLORA_KERNELS_ORT_INCLUDE={ORT_INCLUDE}: no onnxruntime_c_api.h there")
else:
    print("qlora-kernels: ONNX Runtime's C API headers not found (scripts/ort_headers.sh fetches them): "
          "building without the custom operator library", file=sys.stderr)

# kernels/*.cl (one top-level folder, as in the repository's layout) ships inside the
# package as the data-only package qlora_kernels.kernels, where qlora_kernels.opencl reads it.
setup(
    packages=find_packages("src") + ["qlora_kernels.kernels"],
    py_modules=["_qlora_kernels_bnb"],  # the bitsandbytes.backends entry point (pyproject.toml)
    package_dir={"": "src", "qlora_kernels.kernels": "kernels"},
    # fpga: what scripts/rtl_synth.py measured from hls/rtl, read by the FPGA model (fpga/measured.py)
    package_data={"qlora_kernels.kernels": ["*.cl"], "qlora_kernels.fpga": ["rtl_measured.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)
