"""Backend registry and run-time CPU path selection."""
import os
import subprocess
import sys

import pytest

import qlora_kernels as qk
from qlora_kernels import _C
from qlora_kernels.backends import kernel_for


def test_available_backends_and_selection():
    assert qk.available_backends()[:2] == ["reference", "cpu"]
    assert qk.unavailable_reason("cpu") is None
    assert qk.get_backend() == "cpu"
    with qk.use_backend("reference"):
        assert qk.get_backend() == "reference"
        assert kernel_for("dequantize_4bit")[0] == "reference"
    assert qk.get_backend() == "cpu"
    qk.set_backend("reference")
    try:
        assert qk.get_backend() == "reference"
    finally:
        qk.set_backend("cpu")
    assert kernel_for("quantize_4bit")[0] == "cpu"


def test_isa_paths_are_reported():
    assert "scalar" in _C.compiled_isas()
    assert set(_C.supported_isas()) <= set(_C.compiled_isas())
    # best_isa is cpuid's choice; QLORA_KERNELS_ISA caps what the process may run below it
    assert _C.best_isa() in (_C.supported_isas() if not os.environ.get("QLORA_KERNELS_ISA") else _C.compiled_isas())
    assert _C.get_isa() in _C.supported_isas()
    assert _C.openmp()


def _isa_in_subprocess(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, QLORA_KERNELS_ISA=value)
    code = "import qlora_kernels, qlora_kernels._C as c; print(c.get_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("isa", _C.supported_isas())
def test_environment_variable_forces_a_path(isa):
    r = _isa_in_subprocess(isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == isa


def test_environment_variable_with_unknown_path_fails_clearly():
    r = _isa_in_subprocess("avx9000")
    assert r.returncode != 0
    assert "unknown ISA path 'avx9000'" in r.stderr


def test_cpuid_picks_the_widest_supported_path():
    order = ["scalar", "avx2", "avx512", "avx512vnni"]
    supported = [i for i in order if i in _C.supported_isas()]
    if os.environ.get("QLORA_KERNELS_ISA"):  # capped: the runnable paths stop at the cap, cpuid's best is above
        assert supported[-1] == os.environ["QLORA_KERNELS_ISA"]
        assert order.index(_C.best_isa()) >= order.index(supported[-1])
    else:
        assert _C.best_isa() == supported[-1]
