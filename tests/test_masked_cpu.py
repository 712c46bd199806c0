"""scripts/masked_cpu.sh: cpuid answered without AVX-512 in a whole process tree (Linux cpuid
faulting), so every library picks its AVX2 kernels itself, at native speed, and the
program's own SIGSEGV handling is kept for real faults."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    "cpuid_fault" not in Path("/proc/cpuinfo").read_text().split(), reason="this CPU or kernel has no cpuid faulting")


def _masked(code: str, *python_flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PY=sys.executable)
    env.pop("QLORA_KERNELS_ISA", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / "masked_cpu.sh"), "avx2", sys.executable, *python_flags,
                           "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_every_library_and_child_process_sees_an_avx2_only_cpu():
    code = ("import subprocess, sys, torch; from qlora_kernels import _C; "
            "print(_C.best_isa(), torch.backends.cpu.get_cpu_capability()); "
            "print(subprocess.run([sys.executable, '-c', 'from qlora_kernels import _C; print(_C.best_isa())'], "
            "capture_output=True, text=True).stdout.strip()); "
            "print(subprocess.run(['gcc', '-march=native', '-Q', '--help=target'], capture_output=True, "
            "text=True).stdout.split('-mavx512f ')[1].split()[0])")
    r = _masked(code)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("masked_cpu: cpuid picks our avx2 path, torch AVX2, bitsandbytes AVX-512 False")
    assert out[1:] == ["avx2 AVX2", "avx2", "[disabled]"]


def test_a_real_segfault_still_reaches_faulthandler():
    # after a subprocess: its vfork()ed child resets its handlers, which must stay its own
    r = _masked("import ctypes, subprocess; subprocess.run(['true']); ctypes.string_at(0)", "-X", "faulthandler")
    assert r.returncode == -11 or r.returncode == 139, (r.returncode, r.stderr)
    assert "Fatal Python error: Segmentation fault" in r.stderr
