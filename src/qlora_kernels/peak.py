"""The machine's own limits, measured: the fp32 FMA peak of each CPU path this process may
run, and the read bandwidth of the cache levels and of DRAM. Benchmarks divide by them
(a GEMM by the peak of the ISA path it ran on, a GEMV by the bandwidth of the level its
weights live in), which makes a result comparable across machines where a time is not.
``qlora-kernels info --peak`` prints them."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

_SYS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def cache_sizes() -> dict[str, int]:
    """Data/unified cache sizes of CPU 0 in bytes (``L1``, ``L2``, ``L3``), from sysfs;
    levels the kernel does not report are missing. The L3 figure is what one core's
    complex shares (a VM may show only part of the host's)."""
    out: dict[str, int] = {}
    if not _SYS_CACHE.is_dir():
        return out
    for index in sorted(_SYS_CACHE.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = _size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified"):
            out[f"L{level}"] = size
    return out


@dataclass
class Peak:
    threads: int
    fma_gflops: dict[str, float]          # ISA path -> GFLOP/s on `threads` threads
    bandwidth_gbs: dict[str, float]       # "L2" / "L3" / "DRAM" -> GB/s on `threads` threads
    buffer_bytes: dict[str, int]          # the buffer size each bandwidth was measured with
    caches: dict[str, int] = field(default_factory=dict)

    def level_of(self, nbytes: int) -> str:
        """The memory level a working set of nbytes streams from: the smallest measured
        level whose total size (L2 is per core) holds it."""
        l2 = self.caches.get("L2", 0) * self.threads
        if nbytes <= l2 // 2 and "L2" in self.bandwidth_gbs:
            return "L2"
        if nbytes <= self.caches.get("L3", 0) // 2 and "L3" in self.bandwidth_gbs:
            return "L3"
        return "DRAM"

    def table(self) -> str:
        rows = [f"fp32 FMA peak, {self.threads} threads:"]
        rows += [f"  {isa:7s} {g:8.1f} GFLOP/s" for isa, g in self.fma_gflops.items()]
        rows.append(f"read bandwidth, {self.threads} threads:")
        rows += [f"  {lvl:7s} {g:8.1f} GB/s  ({self.buffer_bytes[lvl] / 2**20:.1f} MiB buffer)"
                 for lvl, g in self.bandwidth_gbs.items()]
        if self.caches:
            rows.append("caches (CPU 0): " + ", ".join(f"{k} {v // 1024} KiB" for k, v in self.caches.items()))
        return "\n".join(rows)


def measure(threads: int | None = None, seconds: float = 0.1) -> Peak:
    """Times the probes (about ``seconds`` per figure; a few seconds in all) once per
    process and thread count (None: torch's, resolved before the cache is asked: the
    probes of one thread count were returned for another)."""
    import torch

    return _measure(threads or torch.get_num_threads(), seconds)


@functools.cache
def _measure(threads: int, seconds: float) -> Peak:
    import torch

    from . import _C

    fma: dict[str, float] = {}
    for isa in _C.supported_isas():
        if isa == "avx512vnni" and "avx512" in fma:  # the same fp32 FMAs as avx512 (VNNI adds int8 ones)
            fma[isa] = fma["avx512"]
        else:
            fma[isa] = _C.fma_peak_gflops(isa, threads, seconds)
    caches = cache_sizes()
    sizes = {}
    if "L2" in caches:
        sizes["L2"] = caches["L2"] * threads // 2
    if "L3" in caches:
        sizes["L3"] = max(caches["L3"] // 4, caches.get("L2", 0) * threads * 2)
    sizes["DRAM"] = max(4 * caches.get("L3", 0), 256 << 20)
    bw = {lvl: _C.read_bandwidth_gbs(n, threads, seconds) for lvl, n in sizes.items()}
    return Peak(threads, fma, bw, sizes, caches)


def gemm_fraction(gflops: float, isa: str, peak: Peak | None = None) -> float | None:
    peak = peak or measure()
    p = peak.fma_gflops.get(isa)
    return gflops / p if p else None


def stream_fraction(bytes_per_call: int, seconds: float, peak: Peak | None = None) -> tuple[float, str]:
    """(fraction of the bandwidth of the level the bytes stream from, that level). The level
    is the one their size fits (``level_of``); a rate above that level's measured bandwidth
    shows they were not all read from there (a 25 MB weight, over half of a 32 MB L3, that
    the L3 still mostly holds between calls read as 122% of DRAM bandwidth), so the row is
    then set against the next faster level that was measured."""
    peak = peak or measure()
    rate = bytes_per_call / seconds * 1e-9
    faster = [lvl for lvl in ("L2", "L3", "DRAM") if lvl in peak.bandwidth_gbs]
    level = peak.level_of(bytes_per_call)
    i = faster.index(level) if level in faster else len(faster) - 1
    while i > 0 and rate > peak.bandwidth_gbs[faster[i]]:
        i -= 1
    return rate / peak.bandwidth_gbs[faster[i]], faster[i]


if __name__ == "__main__":  # pragma: no cover
    print(measure(int(os.environ.get("OMP_NUM_THREADS", "0")) or None).table())
