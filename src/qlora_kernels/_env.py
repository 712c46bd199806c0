"""The package's environment variables, checked in one place when the package is
imported. An unknown value is an error naming the variable and the values it takes: a
typo must never quietly turn a fast path off (before this check,
``QLORA_KERNELS_ISA=scaler`` made the cpu backend unavailable and every op ran on the
slow reference backend without a word). Free-form variables (a device selector, a cache
folder) are checked where they are used."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ISA = "QLORA_KERNELS_ISA"
INT8_REPACK = "QLORA_KERNELS_INT8_REPACK"
OPENCL_STYLE = "QLORA_KERNELS_OPENCL_STYLE"
OPENCL_CACHE_MB = "QLORA_KERNELS_OPENCL_CACHE_MB"
BNB = "QLORA_KERNELS_BNB"  # the bitsandbytes backend plugin (integrations/bitsandbytes.py)
TUNE = "QLORA_KERNELS_TUNE"  # per-machine calibration of the CPU kernels (tuning.py)
CACHE = "QLORA_KERNELS_CACHE"  # the cache folder (tuning, converted models)
DROPOUT = "QLORA_KERNELS_DROPOUT"  # how LoRA dropout masks are drawn (functional.py)

OPENCL_STYLES = ("ndrange", "fpga")
DROPOUT_RNGS = ("native", "torch")
_SWITCHES = ("0", "1")


class EnvironmentValueError(ValueError):
    """A QLORA_KERNELS_* variable holds a value the package does not take."""


def _choice(name: str, valid: tuple[str, ...], transform=str) -> None:
    raw = os.environ.get(name)
    if raw is not None and raw != "" and transform(raw) not in valid:
        raise EnvironmentValueError(f"{name}={raw!r} is not valid; valid values: {', '.join(valid)} (or unset)")


def _count(name: str) -> None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return
    try:
        ok = int(raw) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise EnvironmentValueError(f"{name}={raw!r} is not valid; it takes a whole number >= 0 (or unset)")


def switch(name: str, default: bool) -> bool:
    """A 0/1 variable's value (checked at import by ``check``)."""
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else raw == "1"


def cache_dir() -> Path:
    """Where the package keeps what it may recompute: ``$QLORA_KERNELS_CACHE``, else
    ``$XDG_CACHE_HOME/qlora-kernels``, else ``~/.cache/qlora-kernels``."""
    root = os.environ.get(CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qlora-kernels")
    return Path(root)


def _style_name(raw: str) -> str:
    return raw.strip().lower()


def dropout_rng() -> str:
    """'native' (default: counter-based masks drawn by the extension) or 'torch' (torch's
    bernoulli_, the very masks PEFT's nn.Dropout draws under the same seed)."""
    _choice(DROPOUT, DROPOUT_RNGS)  # read per call, so a value set after import is checked too
    return os.environ.get(DROPOUT) or "native"


def opencl_style() -> str:
    return _style_name(os.environ.get(OPENCL_STYLE) or "ndrange")


def check() -> None:
    """Raises EnvironmentValueError for the first variable with a value the package does
    not take. The ISA path is the extension's to judge (it knows what this CPU runs); a
    missing extension is not an error here (the cpu backend then reports why it is
    unavailable)."""
    try:
        from . import _C
    except ImportError:
        _C = None
    if _C is not None:
        try:
            _C.get_isa()
        except ValueError as e:
            raise EnvironmentValueError(str(e)) from None
    _choice(INT8_REPACK, _SWITCHES)
    _choice(BNB, _SWITCHES)
    _choice(TUNE, _SWITCHES)
    _choice(DROPOUT, DROPOUT_RNGS)
    _choice(OPENCL_STYLE, OPENCL_STYLES, _style_name)
    _count(OPENCL_CACHE_MB)


def _running_command() -> bool:
    """Whether this process is the ``qlora-kernels`` command (console script or
    ``python -m qlora_kernels.cli``), which reports bad input as one line, not a traceback."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == "qlora-kernels":
        return True
    argv = list(getattr(sys, "orig_argv", ()))
    return any(a == "-m" and b == "qlora_kernels.cli" for a, b in zip(argv, argv[1:]))


def check_at_import() -> None:
    """``check``; the command prints the error as one line and exits with status 2."""
    try:
        check()
    except EnvironmentValueError as e:
        if _running_command():
            print(f"qlora-kernels: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
