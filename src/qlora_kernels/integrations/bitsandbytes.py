"""A bitsandbytes CPU backend: our kernels behind bitsandbytes' own ``torch.library`` ops, so
that code written for bitsandbytes (``bnb.nn.Linear4bit``, ``bnb.functional``,
transformers' ``BitsAndBytesConfig(load_in_4bit=True)``, PEFT's QLoRA) runs them unchanged.

bitsandbytes (>= 0.45) declares its kernels as ``bitsandbytes::*`` ops and, at the end of
``import bitsandbytes``, calls every entry point of the ``bitsandbytes.backends`` group;
ours (``pyproject.toml``) is ``_qlora_kernels_bnb.load``, a module outside the package
whose import cannot fail, which calls ``load`` here. ``load`` registers a CPU kernel for each op in
``OPS``; each kernel translates bitsandbytes' arguments (any ``quant_storage`` dtype, fp32
or bf16 absmax, the nested 8-bit absmax of ``gemm_4bit``, ``out=``) onto ours and hands
anything it does not take to bitsandbytes' own default kernel, through the dispatcher by
the op's name (``fallbacks()`` counts those calls, by op and reason). Where bitsandbytes'
semantics differ from ours they are kept: non-finite weights quantize as bitsandbytes
quantizes them (its kernel), and its checks and errors stay its own.

``QLORA_KERNELS_BNB=0`` turns the plugin off (bitsandbytes keeps its kernels); ``status()``
says what is ours. A failure while loading never breaks ``import bitsandbytes``: it is
logged once and bitsandbytes' kernels stay in place.

AVX512-BF16 CPUs: bitsandbytes' ``Linear4bit`` in eval mode without grad repacks its weight
into another layout (``[N, K/2]`` panels, transposed bf16 absmax) and calls ``gemv_4bit``,
whose CPU kernel on such a CPU reads that layout. The plugin keeps ``Linear4bit`` from
repacking (its layers then call ``gemm_4bit``, ours), and leaves ``gemv_4bit`` to
bitsandbytes on those CPUs, so no kernel of ours ever reads the repacked layout as if it
were the plain one."""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import warnings
from typing import Callable, Optional

import torch

from .. import _C, formats
from .._errors import NonFiniteError
from ..ops.linear import linear_4bit_impl

_log = logging.getLogger(__name__)
_FALLBACKS: collections.Counter = collections.Counter()
_CALLS: collections.Counter = collections.Counter()
_STATE = {"loaded": False, "error": None, "disabled": False, "ops": (), "repack_kept_off": False}
_LOCK = threading.Lock()
_DEFAULT = None  # the dispatch key set that selects bitsandbytes' own "default" kernels
_LIBRARIES: list = []  # the torch.library fragment holding our kernels


def status() -> dict:
    """Which ``bitsandbytes::`` ops run our kernels, the calls each took and the fallbacks
    to bitsandbytes' default kernel (by op and reason), and why the plugin is off if it is."""
    return {
        "active": _STATE["loaded"],
        "disabled_by_env": _STATE["disabled"],
        "error": _STATE["error"],
        "ours": list(_STATE["ops"]),
        "bitsandbytes": [op for op in ALL_OPS if op not in _STATE["ops"]],
        "linear4bit_repack_kept_off": _STATE["repack_kept_off"],
        "calls": _counted(_CALLS),
        "fallbacks": fallbacks(),
    }


def _counted(counter: collections.Counter) -> dict:
    with _LOCK:
        return dict(counter)


def fallbacks() -> dict:
    """{(op, reason): calls} handed to bitsandbytes' default kernel since the last reset."""
    return _counted(_FALLBACKS)


def reset_counts() -> None:
    with _LOCK:
        _FALLBACKS.clear()
        _CALLS.clear()


class _Fallback(Exception):
    """Raised inside a kernel of ours for arguments it does not take; the caller then runs
    bitsandbytes' default kernel."""


def _default(op: str, overload: str, reason: str, *args):
    name = op if overload == "default" else f"{op}.{overload}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bitsandbytes::{name}", "CompositeExplicitAutograd"):
        # bitsandbytes 0.50 has no CPU or default kernel for its .out overloads: stock raises
        # NotImplementedError for every CPU call of them, so a call we do not take does too
        raise NotImplementedError(f"bitsandbytes::{name} has no CPU kernel in bitsandbytes, and the qlora-kernels "
                                  f"plugin does not take this call: {reason}")
    with _LOCK:
        _FALLBACKS[(name, reason)] += 1
    return getattr(getattr(torch.ops.bitsandbytes, op), overload).redispatch(_DEFAULT, *args)


def _kernel(op: str, overload: str, impl: Callable) -> Callable:
    """Our kernel for one overload, with bitsandbytes' default as the fallback."""
    name = op if overload == "default" else f"{op}.{overload}"

    def kernel(*args):
        try:
            result = impl(*[_plain(a) if isinstance(a, torch.Tensor) else a for a in args])
        except _Fallback as why:
            return _default(op, overload, str(why), *args)
        except Exception as e:  # a failure of ours: the same exception type, naming the op
            raise _naming(e, name) from e
        with _LOCK:
            _CALLS[name] += 1
        return result

    kernel.__name__ = f"qlora_kernels_{op}_{overload}"
    return kernel


def _naming(e: Exception, name: str) -> Exception:
    message = f"bitsandbytes::{name} (qlora-kernels plugin; QLORA_KERNELS_BNB=0 turns it off): {e}"
    try:
        return type(e)(message)
    except Exception:  # noqa: BLE001 - an exception type that takes other arguments
        return RuntimeError(message)


# ---------------------------------------------------------------- arguments ----

def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit data in any quant_storage dtype, as the uint8 bytes it holds."""
    if t.dtype != torch.uint8:
        if not t.is_contiguous():
            raise _Fallback("non-contiguous packed data")
        t = t.view(torch.uint8)
    return t.reshape(-1)


def _f32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype not in formats.INPUT_DTYPES:
        raise _Fallback(f"{what} dtype {t.dtype}")
    return t.float().contiguous()


def _absmax_blocks(absmax: torch.Tensor, blocks: int) -> torch.Tensor:
    """The first ``blocks`` entries of absmax, fp32: bitsandbytes' CPU kernels read the blocks
    they need from a longer absmax, so do we; a short one is bitsandbytes' to handle."""
    if absmax.numel() < blocks:
        raise _Fallback("absmax too short for the shape")
    return _f32(absmax.reshape(-1)[:blocks], "absmax")


def _check_4bit(blocksize: int, quant_type: str) -> None:
    if quant_type not in formats.QUANT_TYPES:  # stock's CPU kernels raise ValueError here (its default, another type)
        raise ValueError(f"quant_type must be one of {formats.QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in formats.BLOCKSIZES:
        raise _Fallback(f"blocksize {blocksize}")


def _cpu(*tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise _Fallback("not a CPU tensor")


def _plain_layout(absmax: torch.Tensor) -> None:
    """bitsandbytes' plain 4-bit layout has a 1-D absmax; its AVX512-BF16 repacked one (Linear4bit
    in eval on such CPUs, which the plugin keeps from happening) a 2-D, transposed one: never
    read as if it were plain."""
    if absmax.dim() != 1:
        raise _Fallback("an absmax that is not 1-D (not the plain layout)")


def _plain(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A Parameter (bitsandbytes' Params4bit included) as the plain tensor of its storage."""
    return t if t is None or type(t) is torch.Tensor else t.data


def _quant_type_of(code: torch.Tensor) -> str:
    """bitsandbytes' gemv_4bit passes the codebook, not its name: ours only for our codebooks."""
    for qt in formats.QUANT_TYPES:
        if code.numel() == 16 and torch.equal(code.float(), formats.codebook_cpu(qt)):
            return qt
    raise _Fallback("a codebook that is neither NF4 nor FP4")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether tensor a holds the bits of b, b contiguous (a memcmp: torch.equal took ~60 µs for
    the 256K bytes of a 4096 x 4096 weight's 8-bit absmax)."""
    if a.shape != b.shape or a.dtype != b.dtype or not a.is_contiguous():
        return False
    return _C.same_bytes(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size())


class _NestedAbsmax:
    """The fp32 absmax decoded from the nested 8-bit one (absmax_code[absmax_8bit[i]] *
    absmax[i // 256] + absmax_offset), kept with the 8-bit tensor's own lifetime (a weak
    key: an entry dies with its tensor, so a new tensor at a freed address never meets an
    old entry) and used only while all four tensors still hold what it was decoded from,
    compared byte for byte at every call. Version counters were not enough: writes
    through ``.data`` or a numpy view do not bump them (the decode went stale), and inference
    tensors have none. The comparison reads the 8-bit absmax (one byte per block, 1/32 of
    the packed weight): ~3 µs, ~8 µs for all four, for a 4096 x 4096 weight, where decoding
    it again took ~500."""

    def __init__(self):
        from torch.utils.weak import WeakIdKeyDictionary  # tensors compare elementwise: keyed by the object

        self._cache = WeakIdKeyDictionary()

    def get(self, absmax_8bit, absmax, code, offset) -> torch.Tensor:
        now = (absmax_8bit, absmax, code, offset)
        with _LOCK:
            hit = self._cache.get(absmax_8bit)
        if hit is not None and all(_same_bits(a, b) for a, b in zip(now, hit[0])):
            return hit[1]
        seen = tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in now)
        # as everywhere else, the blocks needed out of a possibly longer nested absmax
        nested = _absmax_blocks(seen[1], formats.num_blocks(seen[0].numel(), 256))
        decoded = torch.ops.qlora_kernels.dequantize_blockwise_8bit(seen[0], nested, _f32(seen[2], "absmax_code"), 256)
        decoded = decoded.reshape(-1).add_(seen[3].float())
        with _LOCK:
            self._cache[absmax_8bit] = (seen, decoded)
        return decoded


_NESTED = _NestedAbsmax()


# -------------------------------------------------------------------- kernels ----

def _quantize_4bit(A, blocksize, quant_type, quant_storage):
    _cpu(A)
    if quant_type not in formats.QUANT_TYPES:  # stock's kernel raises its own errors (NotImplementedError, ...)
        raise _Fallback(f"quant_type {quant_type!r}")
    _check_4bit(blocksize, quant_type)
    if A.dtype not in formats.INPUT_DTYPES:
        raise _Fallback(f"A dtype {A.dtype}")
    if quant_storage not in (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int8):
        raise _Fallback(f"quant_storage {quant_storage}")
    try:
        packed, absmax = torch.ops.qlora_kernels.quantize_4bit(A, blocksize, quant_type)
    except NonFiniteError:  # NaN/Inf: bitsandbytes quantizes them its way, without raising
        raise _Fallback("non-finite values") from None
    if quant_storage != torch.uint8:
        if packed.numel() % quant_storage.itemsize:
            raise _Fallback(f"{packed.numel()} bytes do not fill whole {quant_storage} elements")
        packed = packed.reshape(-1).view(quant_storage).unsqueeze(1)
    return packed, absmax


def _bnb_cpu_reads_flat(blocksize: int, shape) -> bool:
    """Whether bitsandbytes' own CPU dequantize_4bit takes its pure-torch branch for these
    arguments, which reads a prefix of the flat data (what its default kernel, our fallback,
    does) instead of reshaping it: an odd last dimension, or blocks of 2048 and more where
    bitsandbytes' own flag says its AVX-512 code runs (backends/cpu/ops.py)."""
    try:
        from bitsandbytes.backends.cpu import ops as bnb_cpu
    except ImportError:
        bnb_cpu = None
    return shape[-1] % 2 != 0 or (bool(getattr(bnb_cpu, "_has_avx512", False)) and blocksize >= 2048)


def _dequantize_4bit_into(A, absmax, blocksize, quant_type, shape, out):
    _cpu(A, absmax, out)
    _check_4bit(blocksize, quant_type)
    _plain_layout(absmax)
    packed = _bytes(A)
    nbytes, blocks = formats.packed_numel(out.numel()), formats.num_blocks(out.numel(), blocksize)
    if packed.numel() != nbytes:
        if len(shape) and not _bnb_cpu_reads_flat(blocksize, shape):
            # bitsandbytes' CPU kernel reshapes the data to [rows, cols / 2]: its error, raised the same way
            packed.reshape(math.prod(shape[:-1]), shape[-1] // 2)
        raise _Fallback("packed data of another size than the shape")
    torch.ops.qlora_kernels.dequantize_4bit_out(packed, _absmax_blocks(absmax, blocks), blocksize, quant_type, out)


def _dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    if dtype not in formats.INPUT_DTYPES:
        raise _Fallback(f"dtype {dtype}")
    out = torch.empty(tuple(shape), dtype=dtype)
    _dequantize_4bit_into(A, absmax, blocksize, quant_type, shape, out)
    return out


def _check_out(out: torch.Tensor, shape, dtype) -> None:
    """bitsandbytes' own checks of an ``out`` (its fake kernels', torch._check: RuntimeError)."""
    torch._check(tuple(out.shape) == tuple(shape), lambda: f"Expected out.shape == {tuple(shape)}, got {out.shape}")
    torch._check(out.dtype == dtype, lambda: f"Expected out.dtype == {dtype}, got {out.dtype}")


def _dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out):
    _check_out(out, shape, dtype)
    if out.is_contiguous():
        _dequantize_4bit_into(A, absmax, blocksize, quant_type, shape, out)
    else:  # the kernel writes dense rows: through a dense buffer
        out.copy_(_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype))


def _linear(A, B, shapeB, absmax, blocksize, quant_type, bias):
    """y = A @ dequantize(B).T (+ bias) in fp32 arithmetic, rounded once to A's dtype."""
    _cpu(A, B, absmax, bias)
    _check_4bit(blocksize, quant_type)
    if len(shapeB) != 2 or A.shape[-1] != shapeB[1]:
        raise _Fallback("shapeB is not [N, K] for A")
    N, K = int(shapeB[0]), int(shapeB[1])
    if A.dtype not in formats.INPUT_DTYPES:
        raise _Fallback(f"A dtype {A.dtype}")
    if N == 0 or K == 0 or A.numel() == 0:
        raise _Fallback("an empty product")
    # F.linear's rules, which bitsandbytes' kernel follows: a bias of A's dtype that
    # broadcasts; ours takes the plain [N] one, and the kernel raises or broadcasts the rest
    if bias is not None and (bias.dtype != A.dtype or tuple(bias.shape) != (N,)):
        raise _Fallback("a bias of another dtype than A or another shape than [N]")
    _plain_layout(absmax)
    packed = _bytes(B)
    if packed.numel() != formats.packed_numel(N * K):
        raise _Fallback("packed weight of another size than shapeB")
    absmax = _absmax_blocks(absmax, formats.num_blocks(N * K, blocksize))
    b = None if bias is None else _f32(bias, "bias")
    x = A.reshape(-1, K)
    # The op's implementation, not the op: this runs inside bitsandbytes' op already, and a
    # second trip through the dispatcher is a sizeable part of a one-row product.
    y = linear_4bit_impl(x if x.dtype == torch.float32 else x.float(), packed.reshape(-1, 1),
                         absmax, blocksize, quant_type, N, b)
    return y.to(A.dtype).reshape(*A.shape[:-1], N)


def _gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
               absmax_offset=None):
    if absmax_8bit is not None:
        if absmax_code is None or absmax_offset is None:
            raise _Fallback("nested absmax without its code or offset")
        _cpu(absmax_8bit, absmax_code, absmax_offset)
        if absmax_8bit.dtype != torch.uint8 or absmax_code.numel() != 256:
            raise _Fallback("nested absmax not 8-bit with a 256-entry code")
        absmax = _NESTED.get(absmax_8bit, absmax, absmax_code, absmax_offset)
    return _linear(A, B, shapeB, absmax, blocksize, quant_type, bias)


def _gemv_4bit(A, B, shapeB, absmax, code, blocksize):
    return _linear(A, B, shapeB, absmax, blocksize, _quant_type_of(code), None)


def _gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out):
    _check_out(out, (*A.shape[:-1], shapeB[0]), A.dtype)
    out.copy_(_gemv_4bit(A, B, shapeB, absmax, code, blocksize))


def _quantize_blockwise(A, code, blocksize):
    _cpu(A, code)
    if A.dtype not in formats.INPUT_DTYPES or code.numel() != 256:
        raise _Fallback("A dtype or a code of another size than 256")
    if not bool(torch.isfinite(A).all()):
        raise _Fallback("non-finite values")
    q, absmax = torch.ops.qlora_kernels.quantize_blockwise_8bit(A.float().contiguous(), _f32(code, "code"),
                                                                 blocksize)
    return q.reshape(A.shape), absmax


def _check_dequantize_blockwise(code, blocksize) -> None:
    """Refused before any fallback: 8-bit values index 256 code entries. With a shorter code
    stock's native kernel reads past its end, and bitsandbytes' compiled default kernel (the
    fallback) aborts the process on the bounds check; blocksize 0 divided by zero here."""
    if code.numel() < 256:
        raise ValueError(f"code has {code.numel()} entries; the 8-bit values index 256")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")


def _dequantize_blockwise_f32(A, absmax, code, blocksize):
    _cpu(A, absmax, code)
    if A.dtype != torch.uint8 or code.numel() != 256:
        raise _Fallback("A not uint8 or a code of another size than 256")
    absmax = _absmax_blocks(absmax, formats.num_blocks(A.numel(), blocksize))
    return torch.ops.qlora_kernels.dequantize_blockwise_8bit(A.contiguous(), absmax, _f32(code, "code"), blocksize)


def _dequantize_blockwise(A, absmax, code, blocksize, dtype):
    _check_dequantize_blockwise(code, blocksize)
    if dtype not in formats.INPUT_DTYPES:
        raise _Fallback(f"dtype {dtype}")
    return _dequantize_blockwise_f32(A, absmax, code, blocksize).to(dtype).reshape(A.shape)


def _dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out):
    _check_dequantize_blockwise(code, blocksize)
    _check_out(out, A.shape, dtype)
    out.copy_(_dequantize_blockwise_f32(A, absmax, code, blocksize).reshape(A.shape))


# (op, overload, implementation)
OPS = (
    ("quantize_4bit", "default", _quantize_4bit),
    ("dequantize_4bit", "default", _dequantize_4bit),
    ("dequantize_4bit", "out", _dequantize_4bit_out),
    ("gemm_4bit", "default", _gemm_4bit),
    ("gemv_4bit", "default", _gemv_4bit),
    ("gemv_4bit", "out", _gemv_4bit_out),
    ("quantize_blockwise", "default", _quantize_blockwise),
    ("dequantize_blockwise", "default", _dequantize_blockwise),
    ("dequantize_blockwise", "out", _dequantize_blockwise_out),
)
ALL_OPS = tuple(op if ov == "default" else f"{op}.{ov}" for op, ov, _ in OPS) + (
    "optimizer_update_32bit", "optimizer_update_8bit_blockwise", "int8_linear_matmul", "int8_vectorwise_quant")


def _bf16_repacking_cpu() -> bool:
    """Whether bitsandbytes runs its AVX512-BF16 CPU path (repacked Linear4bit weights)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def _register() -> tuple:
    global _DEFAULT
    import qlora_kernels.functional  # noqa: F401  (declares torch.ops.qlora_kernels.*)

    _DEFAULT = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    bf16 = _bf16_repacking_cpu()
    ours = []
    # All of ours in one library fragment: if any registration fails, destroying it puts every
    # bitsandbytes kernel back (the dispatcher keeps the kernels a registration overrode), so
    # the plugin is either wholly on or wholly off, as status() says.
    lib = torch.library.Library("bitsandbytes", "FRAGMENT")
    try:
        for op, overload, impl in OPS:
            if op == "gemv_4bit" and bf16:
                continue  # its CPU kernel there reads Linear4bit's repacked layout: bitsandbytes' own
            name = op if overload == "default" else f"{op}.{overload}"
            torch.library.register_kernel(f"bitsandbytes::{name}", "cpu", _kernel(op, overload, impl), lib=lib)
            ours.append(name)
    except BaseException:
        lib._destroy()
        raise
    _LIBRARIES.append(lib)  # kept alive: a collected Library unregisters its kernels
    if bf16:
        import bitsandbytes.nn.modules as modules

        # Linear4bit decides at construction whether it will repack (support_avx512bf16_for_cpu);
        # with the plugin on, its layers keep the plain layout and call gemm_4bit (ours).
        modules.has_avx512bf16 = lambda: False
        _STATE["repack_kept_off"] = True
    return tuple(ours)


def load() -> None:
    """The ``bitsandbytes.backends`` entry point: registers our CPU kernels. Never raises."""
    if _STATE["loaded"]:
        return
    try:
        from .. import _env  # importing the package checks every QLORA_KERNELS_* value

        if not _env.switch(_env.BNB, True):
            _STATE["disabled"] = True
            return
        with _overrides_quiet():
            _STATE["ops"] = _register()
        _STATE["loaded"] = True
    except Exception as e:  # noqa: BLE001 - bitsandbytes must import whatever happens here
        _STATE["error"] = f"{type(e).__name__}: {e}"
        _log.warning("qlora-kernels: the bitsandbytes plugin did not load (%s); bitsandbytes keeps its own "
                     "kernels", _STATE["error"])


@contextlib.contextmanager
def _overrides_quiet():
    """Re-registering a CPU kernel makes torch warn that one is overridden: that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        yield
