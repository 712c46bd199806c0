"""scripts/cpu_view.py, the check the CPU-class lanes (scripts/emulated_cpu.sh,
scripts/masked_cpu.sh) run first: it names what every library sees and refuses a lane whose
libraries see another CPU."""
import subprocess
import sys
from pathlib import Path

import torch

from qlora_kernels import _C

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cpu_view.py"


def _view(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "lane", *args], capture_output=True, text=True, timeout=300)


def test_a_lane_whose_libraries_see_another_cpu_is_refused():
    r = _view("no-such-path", torch.backends.cpu.get_cpu_capability())
    assert r.returncode == 1
    assert r.stdout.startswith(f"lane: cpuid picks our {_C.best_isa()} path, torch "
                               f"{torch.backends.cpu.get_cpu_capability()}, bitsandbytes AVX-512 ")
    assert "expected our no-such-path path" in r.stderr and "not running" in r.stderr


def test_torch_seeing_another_cpu_is_refused():
    r = _view(_C.best_isa(), "NO-SUCH-CAPABILITY")
    assert r.returncode == 1 and "not running" in r.stderr
