"""Shared fixtures: every native path the machine can run, and bitsandbytes as the oracle
for the formats (installed by the dev extra; a missing bitsandbytes fails, never skips)."""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _C

# bitsandbytes logs a warning about an optional kernels-community package on CPUs with
# AVX512-BF16; it is irrelevant here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def native_paths() -> list[str]:
    return list(_C.supported_isas())


# (backend, isa) pairs: the reference backend and each CPU path this machine can run.
BACKEND_PATHS = [("reference", None)] + [("cpu", isa) for isa in native_paths()]


@contextlib.contextmanager
def on_path(backend: str, isa: str | None):
    previous = _C.get_isa()
    try:
        if isa is not None:
            _C.set_isa(isa)
        with qk.use_backend(backend):
            yield
    finally:
        _C.set_isa(previous)


@pytest.fixture(params=BACKEND_PATHS, ids=lambda p: p[0] if p[1] is None else f"{p[0]}-{p[1]}")
def path(request):
    with on_path(*request.param):
        yield request.param


@pytest.fixture(scope="session")
def bnb():
    import bitsandbytes
    import bitsandbytes.functional  # noqa: F401

    return bitsandbytes


@contextlib.contextmanager
def no_dynamo():
    """bitsandbytes wraps its pure-torch CPU fallbacks in torch.compile; compiling them
    per test shape costs seconds and changes no result."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, so comparisons see -0.0 vs 0.0 and NaN payloads."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)
