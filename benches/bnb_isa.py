"""The AVX2 pairing for bitsandbytes: its CPU library held to the code it runs on a CPU
without AVX-512, in a process on an AVX-512 machine.

bitsandbytes 0.50's CPU library picks its kernels at run time: its dequantization kernels
have AVX-512 and AVX2 paths, and `Linear4bit` in eval repacks its weight for an
AVX512-BF16 kernel where the CPU has one. Its Python side asks torch
(`torch.backends.cpu.get_cpu_capability()`, held to "AVX2" by `ATEN_CPU_CAPABILITY=avx2`)
and its library (`has_avx512bf16_cpu`). The library answers from two function-local
statics, `supported_avx512f` and `supported_avx512bf16`, each set once from cpuid behind a
C++ guard variable. There is no switch, so this sets them the way cpuid sets them on an
AVX2-only CPU: each static false, each guard marked done (Itanium C++ ABI: a non-zero first
byte). No code of bitsandbytes is changed or replaced; every call still runs its own
kernels, the AVX2 ones.

Bench-only (benches/avx2_pairing.sh sets QLORA_KERNELS_BENCH_BNB_AVX2=1). It must run
before bitsandbytes is imported (the library is loaded here first, by the same path, so
bitsandbytes' own load gets this instance) and it checks that it took: the library's own
queries answer false, and its native FP4 decode writes -0.0 for the zero code, the AVX2
kernel's signature (docs/formats.md), where its AVX-512 kernel writes +0.0."""
from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import struct
from pathlib import Path

ENV = "QLORA_KERNELS_BENCH_BNB_AVX2"
# The statics' and guards' mangled names (each may exist more than once: LTO copies).
_FLAGS = ("_ZZL11has_avx512fvE17supported_avx512f", "_ZZL14has_avx512bf16vE20supported_avx512bf16")
_GUARDS = ("_ZGVZL11has_avx512fvE17supported_avx512f", "_ZGVZL14has_avx512bf16vE20supported_avx512bf16")


def requested() -> bool:
    return os.environ.get(ENV, "0") == "1"


def _library() -> Path:
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("bitsandbytes is not installed")
    lib = Path(next(iter(spec.submodule_search_locations))) / "libbitsandbytes_cpu.so"
    if not lib.exists():
        raise RuntimeError(f"{lib} not found")
    return lib


def _symbols(path: Path) -> dict[str, int]:
    """Local and global symbols of an ELF64 little-endian file's .symtab: name -> address."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise RuntimeError(f"{path}: not an ELF64 little-endian file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out: dict[str, int] = {}
    for _name, kind, _flags, _addr, off, size, link, _info, _align, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        stroff = sections[link][4]
        for i in range(size // entsize):
            st_name, _st_info, _other, _shndx, st_value, _st_size = struct.unpack_from("<IBBHQQ", data,
                                                                                       off + i * entsize)
            end = data.index(b"\0", stroff + st_name)
            out[data[stroff + st_name:end].decode()] = st_value
    return out


def _base(path: Path) -> int:
    """Load address of the mapped library (its first mapping, file offset 0)."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == real and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise RuntimeError(f"{path} is not mapped")


def hold_to_avx2() -> str:
    """Holds bitsandbytes' CPU library to its non-AVX-512 kernels; returns a one-line summary."""
    import sys

    if "bitsandbytes" in sys.modules:
        raise RuntimeError("hold bitsandbytes to AVX2 before importing it")
    path = _library()
    lib = ctypes.CDLL(str(path))
    base, syms = _base(path), _symbols(path)
    flags = [a for n, a in syms.items() if n.startswith(_FLAGS)]
    guards = [a for n, a in syms.items() if n.startswith(_GUARDS)]
    if not flags or len(flags) != len(guards):
        raise RuntimeError(f"{path}: the CPU-feature statics were not found (another bitsandbytes build?)")
    for a in flags:
        ctypes.c_uint8.from_address(base + a).value = 0
    for a in guards:
        ctypes.c_uint8.from_address(base + a).value = 1
    for query in ("has_avx512f_cpu", "has_avx512bf16_cpu"):
        fn = getattr(lib, query)
        fn.restype = ctypes.c_bool
        if fn():
            raise RuntimeError(f"bitsandbytes' {query}() still answers true")
    return _check_fp4_zero(lib, path)


def _check_fp4_zero(lib: ctypes.CDLL, path: Path) -> str:
    """bitsandbytes' native FP4 decode of the zero code 8 (its own kernel, called as its
    backend calls it): -0.0 from its AVX2 kernel, +0.0 from its AVX-512 one."""
    m, n, blocksize = 4, 128, 64
    packed = (ctypes.c_uint8 * (m * n // 2))(*([0x88] * (m * n // 2)))
    absmax = (ctypes.c_float * (m * n // blocksize))(*([1.0] * (m * n // blocksize)))
    out = (ctypes.c_float * (m * n))()
    lib.cdequantize_blockwise_cpu_fp4_fp32(packed, absmax, out, ctypes.c_longlong(blocksize), ctypes.c_longlong(m),
                                           ctypes.c_longlong(n))
    negative = sum(1 for v in out if v == 0.0 and math.copysign(1.0, v) < 0)
    if negative != m * n:
        raise RuntimeError(f"bitsandbytes' FP4 decode wrote -0.0 for {negative} of {m * n} zero codes: "
                           "its AVX-512 kernel still runs")
    return (f"bitsandbytes held to AVX2 ({path.name}: has_avx512f_cpu/has_avx512bf16_cpu false; its native FP4 "
            f"decode wrote -0.0 for all {m * n} zero codes, its AVX2 kernel's signature)")
