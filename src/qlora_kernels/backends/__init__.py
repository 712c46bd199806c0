"""Backend registry. An op is declared once (``qlora_kernels.ops``); each backend module
registers its kernels here with ``register_kernel(op, backend)``. The selected backend
runs an op when it has a kernel for it; otherwise the ``reference`` kernel runs (a
backend that is still growing stays usable, and the fallback is visible through
``kernel_for``)."""
from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Callable, Iterator

_KERNELS: dict[str, dict[str, Callable]] = {}
_KNOWN = ("reference", "cpu", "opencl", "hls")
_MODULES = {name: f"qlora_kernels.backends.{name}" for name in _KNOWN}
_LOADED: dict[str, bool] = {}
_REASONS: dict[str, str] = {}


class _Scoped(threading.local):
    # A class default: a thread that never entered use_backend reads None without the
    # AttributeError that getattr(local, name, default) raises and catches inside
    # (get_backend runs on every direct call of a prepared weight).
    name = None


_state = _Scoped()
_default = ["cpu"]


def register_kernel(op: str, backend: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        _KERNELS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def register_dequantize_from_out(backend: str, out_kernel: Callable) -> None:
    """A backend's ``dequantize_4bit`` from its ``dequantize_4bit_out``: a fresh tensor of
    the shape and dtype asked for, filled by the out kernel."""

    def dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype):
        import torch

        out = torch.empty(shape, dtype=dtype)
        out_kernel(packed, absmax, blocksize, quant_type, out)
        return out

    register_kernel("dequantize_4bit", backend)(dequantize_4bit)


def _load(name: str) -> bool:
    if name not in _LOADED:
        try:
            importlib.import_module(_MODULES[name])
            _LOADED[name] = True
        except Exception as e:  # an unbuildable/unloadable backend is reported, not fatal
            _LOADED[name] = False
            _REASONS[name] = f"{type(e).__name__}: {e}"
    return _LOADED[name]


def available_backends() -> list[str]:
    """Backends that loaded on this machine, in preference order."""
    return [b for b in _KNOWN if _load(b)]


def unavailable_reason(name: str) -> str | None:
    """Why a known backend did not load (None when it did)."""
    if name not in _MODULES:
        raise ValueError(f"backend: unknown backend {name!r}; known backends: {list(_KNOWN)}")
    return None if _load(name) else _REASONS.get(name, "not loaded")


def _check(name: str) -> str:
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"backend: unknown backend {name!r}; known backends: {list(_KNOWN)}")
    if not _load(name):
        raise RuntimeError(f"backend: {name!r} is not available here ({_REASONS.get(name)})")
    return name


def get_backend() -> str:
    name = _state.name or _default[0]
    if name == "cpu" and not _load("cpu"):
        return "reference"
    return name


def set_backend(name: str) -> None:
    """Select the backend for this process (``use_backend`` scopes it instead)."""
    _default[0] = _check(name)
    _state.name = None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the ops of this thread on ``name`` inside the ``with`` block."""
    _check(name)
    previous = _state.name
    _state.name = name
    try:
        yield name
    finally:
        _state.name = previous


def kernel_for(op: str, backend: str | None = None) -> tuple[str, Callable]:
    backend = backend or get_backend()
    _load(backend)
    _load("reference")
    impls = _KERNELS.get(op, {})
    if backend in impls:
        return backend, impls[backend]
    return "reference", impls["reference"]


def run(op: str, *args):
    return kernel_for(op)[1](*args)
